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


def test_a_pool_mapped_in_the_process_that_made_it_leaves_the_tracker_clean() -> None:
    # Two nodes in one process (as in the service tests): one maps the other's pool. The
    # owner's unlink must still find its segment on the resource tracker's books, or the
    # tracker reports a KeyError as the process exits; and nothing is left behind.
    code = (
        "import os, sys; sys.path.insert(0, os.getcwd());"
        "from libs.kvtransfer.layout import KVLayout; from libs.kvtransfer.pool import KVPool;"
        "layout = KVLayout('float32', 2, 4, 1, 8);"
        "owner = KVPool.allocate(layout, 8, shared=True); peer = KVPool.attach_shm(owner.shm_name, layout, 8);"
        "peer.tensor[0].fill_(3.0); assert float(owner.tensor[0].sum()) > 0;"
        "print(owner.shm_name, flush=True); peer.close(); owner.close()"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "KeyError" not in run.stderr and "leaked" not in run.stderr, run.stderr
    assert not os.path.exists(f"/dev/shm/{run.stdout.strip()}")
