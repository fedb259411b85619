"""Host KV copies run on the calling thread alone: no OpenMP team beside the engine's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from libs.kvtransfer.align import Piece, copy_pieces

# In a fresh process (no OpenMP team yet): a thread copies pieces of a few MB with torch's
# thread count at 2, then waits; while it waits, the process has only the threads it had
# before plus that one if the copy started no OpenMP team (torch's copy adds a worker).
_CHILD = textwrap.dedent("""
    import os, threading, torch
    from libs.kvtransfer.align import Piece, copy_pieces, piece_view
    torch.set_num_threads(2)
    src = torch.randint(0, 255, (16 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = [Piece(0, 8 << 20, 4 << 20), Piece(4 << 20, 0, 65536, 32, 131072)]
    copied, release = threading.Event(), threading.Event()
    def work():
        if os.environ.get("WITH_TORCH"):
            for p in pieces:
                piece_view(dst, p.dst_offset, p.width, p.height, p.pitch).copy_(
                    piece_view(src, p.src_offset, p.width, p.height, p.pitch))
        else:
            copy_pieces(src, dst, pieces)
        copied.set()
        release.wait()
    before = len(os.listdir("/proc/self/task"))
    t = threading.Thread(target=work)
    t.start()
    copied.wait()
    print(len(os.listdir("/proc/self/task")) - before)
    release.set()
    t.join()
""")


def _extra_threads(with_torch: bool) -> int:
    env = {"WITH_TORCH": "1"} if with_torch else {}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, **env, "OMP_NUM_THREADS": "2"}, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


def test_host_copies_start_no_openmp_team() -> None:
    assert _extra_threads(with_torch=True) > 1  # the check can see a team: torch's copy starts one
    assert _extra_threads(with_torch=False) == 1  # only the copying thread itself


def test_host_copy_pieces_move_the_bytes() -> None:
    src = torch.arange(1 << 16, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros_like(src)
    copy_pieces(src, dst, [Piece(0, 4096, 1024), Piece(8192, 16384, 256, 4, 1024)])
    assert torch.equal(dst[4096:5120], src[:1024])
    for r in range(4):
        assert torch.equal(dst[16384 + r * 1024 : 16384 + r * 1024 + 256], src[8192 + r * 1024 : 8192 + r * 1024 + 256])
    assert int(dst[:4096].count_nonzero()) == 0
