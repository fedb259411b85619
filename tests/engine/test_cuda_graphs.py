"""CudaGraphRunner: buckets, padding of the static buffers, eager fallbacks; replay on CUDA."""

from __future__ import annotations

import pytest
import torch

from libs.engine.cuda_graphs import CudaGraphRunner, default_buckets


class RecordingFn:
    """A decode forward whose logits depend on every input row; records what it was given."""

    def __init__(self, vocab: int = 5) -> None:
        self.vocab = vocab
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, input_ids, positions, block_tables, context_lens, slot_mapping):  # type: ignore[no-untyped-def]
        self.calls.append(tuple(t.clone() for t in (input_ids, positions, block_tables, context_lens, slot_mapping)))
        row = (
            input_ids.float() * 1000 + positions.float() * 100 + context_lens.float() * 10
            + block_tables[:, 0].float() + slot_mapping.float() / 7  # columns past a row's blocks are not its data
        )
        return row[:, None] + torch.arange(self.vocab, dtype=torch.float32, device=row.device)[None, :]


def _batch(device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor([11, 12, 13], device=device),
        torch.tensor([20, 3, 40], device=device),
        torch.tensor([[4, 5], [6, 0], [7, 8]], dtype=torch.int32, device=device),
        torch.tensor([21, 4, 41], dtype=torch.int32, device=device),
        torch.tensor([5 * 16 + 4, 6 * 16 + 3, 8 * 16 + 8], device=device),
    )


def test_default_buckets() -> None:
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert default_buckets(200) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 200]
    assert default_buckets(5) == [1, 2, 4, 5]
    assert default_buckets(1) == [1]
    with pytest.raises(ValueError):
        default_buckets(0)


def test_bucket_for() -> None:
    runner = CudaGraphRunner(RecordingFn(), max_num_seqs=24, max_blocks_per_seq=4, device="cpu", use_graphs=False)
    assert runner.buckets == [1, 2, 4, 8, 16, 24]
    assert [runner.bucket_for(n) for n in (1, 2, 3, 5, 16, 17, 24, 25)] == [1, 2, 4, 8, 16, 24, 24, None]


def test_padded_call_matches_unpadded_rows_and_pads_with_scratch() -> None:
    fn = RecordingFn()
    runner = CudaGraphRunner(fn, max_num_seqs=8, max_blocks_per_seq=4, device="cpu", scratch_block=9, use_graphs=False)
    batch = _batch()
    got = runner(*batch)
    want = fn(*batch)
    assert torch.equal(got, want)
    ids, pos, tables, lens, slots = fn.calls[0]
    assert ids.tolist() == [11, 12, 13, 0]  # padded to the bucket of 4
    assert pos.tolist() == [20, 3, 40, 0]
    assert tables.tolist() == [[4, 5, 9, 9], [6, 0, 9, 9], [7, 8, 9, 9], [9, 9, 9, 9]]
    assert lens.tolist() == [21, 4, 41, 1]
    assert slots.tolist() == [84, 99, 136, -1]


def test_smaller_batch_after_larger_repads_stale_rows() -> None:
    fn = RecordingFn()
    runner = CudaGraphRunner(fn, max_num_seqs=8, max_blocks_per_seq=4, device="cpu", use_graphs=False)
    five = tuple(torch.cat([t, t[:2]]) for t in _batch())
    runner(*five)  # bucket 8: rows 0-4 real
    three = tuple(t.flip(0) for t in _batch())
    assert torch.equal(runner(*three), fn(*three))
    ids, pos, tables, lens, slots = fn.calls[1]  # bucket 4: row 3 held row 3 of the last batch
    assert ids.tolist() == [13, 12, 11, 0]
    assert slots.tolist() == [136, 99, 84, -1]
    assert lens.tolist() == [41, 4, 21, 1]
    assert tables.tolist() == [[7, 8, 0, 0], [6, 0, 0, 0], [4, 5, 0, 0], [0, 0, 0, 0]]


def test_too_large_batch_or_table_runs_eagerly_on_given_tensors() -> None:
    fn = RecordingFn()
    runner = CudaGraphRunner(fn, max_num_seqs=2, max_blocks_per_seq=2, device="cpu", use_graphs=False)
    batch = _batch()
    assert torch.equal(runner(*batch), fn(*batch))
    assert fn.calls[0][0].shape == (3,)  # three rows: above the largest bucket, not padded
    wide = (batch[0][:1], batch[1][:1], torch.tensor([[1, 2, 3]], dtype=torch.int32), batch[3][:1], batch[4][:1])
    runner(*wide)
    assert fn.calls[2][2].tolist() == [[1, 2, 3]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_on_cuda() -> None:
    fn = RecordingFn(vocab=7)
    runner = CudaGraphRunner(fn, max_num_seqs=8, max_blocks_per_seq=4, device="cuda")
    runner.capture()
    assert runner.captured
    for rows in (3, 1, 8, 5):
        batch = tuple(t.repeat(3, *([1] * (t.dim() - 1)))[:rows] for t in _batch("cuda"))
        got = runner(*batch).clone()
        torch.testing.assert_close(got, fn(*batch), rtol=0, atol=0)
