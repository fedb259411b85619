"""compose.yaml's ``vllm`` profile: CPU vLLM nodes and their gateway (docs/vllm.md).

Checked as tests/test_compose.py checks the default services (no Docker engine
needed): real entry points whose flags and environment parse into a vLLM node's
configuration, variables some service reads, and an inline Dockerfile that copies what
exists and builds the venv with scripts/setup.sh --vllm.
"""

from __future__ import annotations

import importlib
import re

import pytest

from tests.test_compose import COMPOSE, NATS_URL, PARSERS, ROOT, SERVICES, _known_env_vars, _service_env

VLLM_SERVICES = ["vllm-prefill", "vllm-decode", "vllm-gateway"]


def test_vllm_services_are_only_in_the_vllm_profile():
    assert {n for n, s in SERVICES.items() if "profiles" in s} == set(VLLM_SERVICES)
    for name in VLLM_SERVICES:
        assert SERVICES[name]["profiles"] == ["vllm"]
        assert all(dep in SERVICES for dep in SERVICES[name]["depends_on"])
    assert SERVICES["vllm-gateway"]["ports"] == ["${FLOWKV_VLLM_PORT:-8001}:8000"]
    assert set(SERVICES["vllm-gateway"]["depends_on"]) == {"scheduler", "vllm-prefill", "vllm-decode"}


@pytest.mark.parametrize(("name", "role"), [("vllm-prefill", "prefill"), ("vllm-decode", "decode")])
def test_vllm_nodes_parse_into_vllm_engines_on_cpu(name, role, monkeypatch):
    command = SERVICES[name]["command"]
    assert command[:2] == ["flowkv", "node"]
    for key in [k for k in __import__("os").environ if k.startswith("FLOWKV_")]:
        monkeypatch.delenv(key)
    env = _service_env(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    module_name, func, _ = PARSERS["node"]
    cfg, nats_cfg = getattr(importlib.import_module(module_name), func)(command[2:])
    assert (cfg.engine, cfg.role, cfg.node_id, cfg.device, cfg.block_size) == ("vllm", role, f"{name}-0", "cpu", 32)
    assert cfg.kv_host == name  # the other node reaches it by its service name
    assert nats_cfg.url == NATS_URL
    assert SERVICES[name]["ipc"] == "host"  # vLLM's KV cache is a shared-memory segment
    assert SERVICES[name]["healthcheck"]["test"][-4:] == ["--check-node", f"{name}-0", "--timeout", "3"]


@pytest.mark.parametrize("name", VLLM_SERVICES)
def test_vllm_services_set_only_variables_something_reads(name):
    known = _known_env_vars()
    for var in _service_env(name):
        if var.startswith("VLLM_"):
            assert var == "VLLM_CPU_KVCACHE_SPACE"  # read by vLLM itself (GiB of KV cache)
        else:
            assert var in known, f"{name}: {var} is read by no service"


def test_vllm_image_is_built_by_the_setup_script_from_what_exists():
    build = COMPOSE["x-flowkv-vllm-service"]["build"]
    text = build["dockerfile_inline"]
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"the vLLM image copies {part}, which is not in the repository"
    assert "bash scripts/setup.sh --vllm" in text
    assert "/app/.venv-vllm-node/bin" in text  # where setup.sh --vllm puts the venv, on PATH
