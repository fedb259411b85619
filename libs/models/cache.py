"""The FlowKV cache dir and the one way a directory in it is built."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any


def cache_dir() -> str:
    """``$FLOWKV_CACHE_DIR``, default ``~/.cache/flowkv``."""
    return os.environ.get("FLOWKV_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "flowkv"))


def publish_dir(target: str, fill: Callable[[str], Any]) -> str:
    """Build a cache directory once: ``fill`` a temporary one beside ``target``, then rename
    it into place, so no process ever sees a half-written directory. If another process
    got there first, its directory stays and ours is dropped."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(target))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            pass  # another process built it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
