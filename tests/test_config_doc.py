"""docs/configuration.md is exactly what scripts/gen_config_doc.py makes of the config dataclasses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_is_up_to_date():
    gen = _generator()
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is stale: run `make config-doc` (python scripts/gen_config_doc.py)"
    )


def test_every_flowkv_up_flag_is_in_the_doc():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for flag, env in [("--prefill-nodes", "FLOWKV_UP_PREFILL_NODES"), ("--nats-token", "FLOWKV_UP_NATS_TOKEN")]:
        assert f"| `{flag}` | `{env}` |" in text
    assert "| `--nats-url` | `FLOWKV_NATS_URL` | str | `nats://127.0.0.1:4222` |" in text
    assert "| `--nats-token` | `FLOWKV_NATS_TOKEN` | str | *secret*, unset |" in text


def test_check_mode_reports_a_stale_doc(tmp_path, monkeypatch):
    gen = _generator()
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(gen, "DOC", stale)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    assert stale.read_text() == gen.render()
