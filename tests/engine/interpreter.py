"""Run Triton kernel test jobs on CUDA, or on CPU in Triton's interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is imported,
so off CUDA the jobs run in a child: the test file itself, executed as a script with the
jobs and a path for the results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

CUDA = torch.cuda.is_available()
_REPO = Path(__file__).resolve().parents[2]


def run_jobs(jobs: list[dict[str, Any]], tmp_path: Path, script: str, execute: Callable[[list], list]) -> list[Any]:
    """``execute(jobs)`` here on CUDA; else ``python script jobs.pt results.pt`` under the interpreter."""
    if CUDA:
        return execute(jobs)
    pytest.importorskip("triton")
    src, dst = tmp_path / "jobs.pt", tmp_path / "results.pt"
    torch.save(jobs, src)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(_REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, script, str(src), str(dst)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(dst)
