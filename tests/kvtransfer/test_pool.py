"""The shared pool's life cycle: segments of dead owners are swept."""

from __future__ import annotations

import os
import subprocess
import sys

from libs.kvtransfer.layout import KVLayout
from libs.kvtransfer.pool import KVPool, sweep_stale_segments

LAYOUT = KVLayout("float32", num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)


def test_segment_of_a_killed_owner_is_swept() -> None:
    # A child makes a shared pool and dies without closing it, its resource tracker gone
    # too (as when a node's whole process group is SIGKILLed): nothing unlinks the segment.
    code = (
        "import os, sys; sys.path.insert(0, os.getcwd());"
        "from multiprocessing import resource_tracker;"
        "from libs.kvtransfer.layout import KVLayout; from libs.kvtransfer.pool import KVPool;"
        "p = KVPool.allocate(KVLayout('float32', 2, 4, 1, 8), 8, shared=True); print(p.shm_name, flush=True);"
        "resource_tracker.unregister('/' + p.shm_name, 'shared_memory');"
        "os._exit(0)"
    )
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.exists(f"/dev/shm/{name}")
    live = KVPool.allocate(LAYOUT, 8, shared=True)  # ours: alive, must survive the sweep
    try:
        assert name not in os.listdir("/dev/shm")  # allocate swept it
        assert sweep_stale_segments() == []
        assert os.path.exists(f"/dev/shm/{live.shm_name}")
    finally:
        live.close()
    assert not os.path.exists(f"/dev/shm/{live.shm_name}")
