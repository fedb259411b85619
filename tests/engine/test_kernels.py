"""Paged decode attention and KV writes: Triton kernels against the torch reference.

On a CUDA machine the kernels run on the GPU, in this process. Without one they run in
Triton's CPU interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton
is first imported: so all kernel calls of this file run in one child process
(this file run as a script), fed with inputs saved by the tests and answering with the
outputs. Without triton the kernel tests skip.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from libs.engine.kernels.kv_write import write_kv_ref
from libs.engine.kernels.paged_attention import choose_num_splits, paged_decode_attention_ref
from tests.engine.interpreter import CUDA, run_jobs

DEVICE = torch.device("cuda" if CUDA else "cpu")


def _execute(jobs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Run each job's kernel on DEVICE; returns the written tensor (``out`` or the pool) on CPU."""
    from libs.engine.kernels import paged_decode_attention, write_kv

    results = []
    for job in jobs:
        args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in job["args"].items()}
        if job["kind"] == "attention":
            # ``wide`` is NaN-poisoned; ``out`` is its last-dim slice [lo, hi) (strided when
            # the slice is narrower), so the result shows both what was and wasn't written.
            wide = args.pop("wide")
            lo, hi = job["out_slice"]
            out = wide[..., lo:hi]
            got = paged_decode_attention(**args, out=out)
            assert got.data_ptr() == out.data_ptr()
            results.append(wide.cpu())
        else:
            write_kv(**args)
            results.append(args["kv_pool"].cpu())
    return results


def _run_jobs(jobs: list[dict[str, Any]], tmp_path: Path) -> list[torch.Tensor]:
    return run_jobs(jobs, tmp_path, __file__, _execute)


def _make_case(
    seed: int,
    lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_blocks: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and pool; each sequence's blocks are scattered over the pool (fragmented)."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_layers = len(lens), 3
    num_blocks = batch * max_blocks + 5
    pool = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen)
    return (
        q.to(dtype).to(DEVICE),
        pool.to(dtype).to(DEVICE),
        tables.to(torch.int32).to(DEVICE),
        torch.tensor(lens, dtype=torch.int32, device=DEVICE),
    )


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _attention_job(seed: int, case: tuple, dtype: torch.dtype, layer: int, pad: int = 0) -> dict[str, Any]:
    lens, hq, hkv, head_dim, block_size, max_blocks = case
    q, pool, tables, ctx = _make_case(seed, lens, hq, hkv, head_dim, block_size, max_blocks, dtype)
    wide = torch.full((len(lens), hq, head_dim + 2 * pad), float("nan"), dtype=dtype)
    args = dict(q=q, kv_pool=pool, layer=layer, block_tables=tables, context_lens=ctx, scale=head_dim**-0.5)
    return {"kind": "attention", "args": {**args, "wide": wide}, "out_slice": (pad, pad + head_dim)}


# (lens, Hq, Hkv, D, block_size, max_blocks): lengths cross block, tile (64) and split edges.
CASES = [
    ([1, 15, 16, 17], 4, 4, 32, 16, 4),  # MHA, block edges, several splits
    ([130, 64, 65], 8, 2, 64, 16, 10),  # GQA 4, tile edges
    ([0, 200, 33], 9, 3, 64, 8, 26),  # GQA 3 (SmolLM2 heads), an empty padded row
    ([96, 7, 250, 128, 1, 31, 64, 90], 16, 8, 32, 16, 16),  # B*Hkv >= 32: single split
]
BF16_CASE = ([77, 160], 8, 2, 64, 16, 12)


def _write_job() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(4)
    pool = torch.randn(6, 2, 2, 4, 3, 16, generator=gen)
    k = torch.randn(5, 3, 16, generator=gen)
    v = torch.randn(5, 3, 16, generator=gen)
    slots = torch.tensor([22, -1, 3, 4, -1], dtype=torch.int64)
    return {"kind": "write_kv", "args": dict(kv_pool=pool, layer=1, k=k, v=v, slot_mapping=slots)}


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Every kernel job of this file, run once (one interpreter child on CPU)."""
    jobs = [_attention_job(1 + i, case, torch.float32, layer=1) for i, case in enumerate(CASES)]
    jobs.append(_attention_job(9, BF16_CASE, torch.bfloat16, layer=2, pad=32))
    jobs.append(_write_job())
    return jobs, _run_jobs(jobs, tmp_path_factory.mktemp("kernels"))


def _check_attention(job: dict[str, Any], wide: torch.Tensor, tol: float) -> None:
    args = {k: v for k, v in job["args"].items() if k != "wide"}
    want = paged_decode_attention_ref(**args)
    lo, hi = job["out_slice"]
    wide = wide.to(want.device)  # the job's inputs (and so the reference) are on DEVICE
    out = wide[..., lo:hi]
    assert not torch.isnan(out).any(), "some of out was not written"
    assert torch.isnan(wide[..., :lo]).all() and torch.isnan(wide[..., hi:]).all(), "wrote outside out"
    assert _rel_err(out, want) < tol
    for b, n in enumerate(args["context_lens"].tolist()):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"lens{c[0]}-h{c[1]}/{c[2]}" for c in CASES])
def test_decode_attention_fp32_matches_reference(kernel_runs, index: int) -> None:
    jobs, results = kernel_runs
    _check_attention(jobs[index], results[index], 1e-3)


def test_decode_attention_bf16_strided_out_matches_reference(kernel_runs) -> None:
    jobs, results = kernel_runs
    _check_attention(jobs[len(CASES)], results[len(CASES)], 1e-2)


def test_write_kv_kernel_matches_reference_and_skips_padding(kernel_runs) -> None:
    jobs, results = kernel_runs
    args = jobs[-1]["args"]
    want = args["kv_pool"].clone()
    write_kv_ref(want, 1, args["k"], args["v"], args["slot_mapping"])
    got = results[-1]
    assert torch.equal(got, want)
    assert torch.equal(got[5, 1, 0, 2], args["k"][0]) and torch.equal(got[5, 1, 1, 2], args["v"][0])
    assert torch.equal(got[1, 1, 1, 0], args["v"][3])
    untouched = torch.ones(6, 4, dtype=torch.bool)
    untouched[5, 2] = untouched[0, 3] = untouched[1, 0] = False
    by_slot = lambda pool: pool[:, 1].permute(0, 2, 1, 3, 4)  # noqa: E731  [block, offset, K/V, H, D]
    assert torch.equal(by_slot(got)[untouched], by_slot(args["kv_pool"])[untouched])
    assert torch.equal(got[:, 0], args["kv_pool"][:, 0])


def test_reference_matches_dense_attention() -> None:
    """The reference itself against plain softmax attention over a contiguous KV."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(21, 2, 16, generator=gen)
    v = torch.randn(21, 2, 16, generator=gen)
    q = torch.randn(1, 4, 16, generator=gen)
    pool = torch.zeros(6, 1, 2, 4, 2, 16)
    table = torch.tensor([[5, 0, 3, 1, 4, 2]], dtype=torch.int32)
    for t in range(21):
        pool[table[0, t // 4], 0, 0, t % 4] = k[t]
        pool[table[0, t // 4], 0, 1, t % 4] = v[t]
    got = paged_decode_attention_ref(q, pool, 0, table, torch.tensor([21], dtype=torch.int32), 0.25)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    probs = torch.softmax(torch.einsum("hd,nhd->hn", q[0], kk) * 0.25, dim=-1)
    torch.testing.assert_close(got[0], torch.einsum("hn,nhd->hd", probs, vv))


def test_write_kv_ref_ignores_negative_slots() -> None:
    pool = torch.zeros(2, 1, 2, 2, 1, 2)
    k = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    v = -k
    write_kv_ref(pool, 0, k, v, torch.tensor([-1, 3]))
    assert pool[1, 0, 0, 1, 0].tolist() == [3.0, 4.0]
    assert pool[1, 0, 1, 1, 0].tolist() == [-3.0, -4.0]
    assert int(torch.count_nonzero(pool)) == 4


def test_choose_num_splits_depends_only_on_shapes() -> None:
    cpu = torch.device("cpu")  # 16 "SMs" off CUDA: two waves = 32 programs
    assert choose_num_splits(1, 8, 8192, cpu) == 4
    assert choose_num_splits(1, 1, 8192, cpu) == 32
    assert choose_num_splits(1, 1, 100, cpu) == 2  # 100 tokens fill two 64-token tiles
    assert choose_num_splits(3, 2, 8192, cpu) == 8  # ceil(32 / 6) = 6 -> 8
    assert choose_num_splits(64, 8, 8192, cpu) == 1


if __name__ == "__main__":
    # Child process of _run_jobs: TRITON_INTERPRET=1 is already in the environment.
    torch.set_num_threads(2)
    torch.save(_execute(torch.load(sys.argv[1])), sys.argv[2])
