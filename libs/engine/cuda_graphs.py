"""CUDA graphs for the decode forward: one captured graph per batch-size bucket.

A decode step of a small batch is a few hundred short kernels; launching them one by
one from Python costs more than running them. :class:`CudaGraphRunner` captures the
decode forward once per bucket of batch sizes and replays it, after copying the step's
inputs into static buffers and padding the batch up to the bucket.

Contract the decode forward ``fn(input_ids, positions, block_tables, context_lens,
slot_mapping) -> logits`` must meet to be captured:

- no host synchronisation: no ``.item()``, ``.tolist()``, ``.cpu()``, printing of device
  tensors, ``torch.cuda.synchronize()``, nor Python branches on tensor values;
- no data-dependent shapes (no boolean-mask indexing, ``nonzero``, ``unique``); every
  shape follows from the arguments' shapes;
- reads its inputs only from the tensors it is given (they are the static buffers) and
  allocates its output inside the call (it lives in the graph's memory pool and is
  overwritten by the next replay: consume it before the next call);
- padding rows (``context_lens == pad_context_len``, block table row of
  ``scratch_block``, ``slot_mapping == -1``) must be harmless: KV writes skip slots < 0
  (:func:`libs.engine.kernels.write_kv`) and attention of a row only reads its own blocks.

Weights, the KV pool and rotary tables are read at their fixed addresses: they must not
be reallocated after capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def default_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32, and ``max_num_seqs``.

    Args:
        max_num_seqs: the largest batch the engine runs.

    Returns:
        Increasing bucket sizes, the last equal to ``max_num_seqs``.
    """
    if max_num_seqs <= 0:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    sizes += list(range(96, max_num_seqs + 1, 32))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class CudaGraphRunner:
    """Replays captured decode graphs; a drop-in for ``ModelRunner.decode_fn``.

    Args:
        fn: the decode forward (see the module docstring for its contract).
        max_num_seqs: the largest batch; larger batches run ``fn`` eagerly.
        max_blocks_per_seq: block table width ``M`` of the static buffer
            (``ceil(max_model_len / block_size)``); wider tables run eagerly.
        device: the CUDA device (or CPU with ``use_graphs=False``).
        scratch_block: block id that padding rows point at (read only, never written).
        pad_context_len: context length of padding rows (1 reads one token of the
            scratch block, so every attention backend sees a non-empty row).
        buckets: batch sizes to capture; defaults to :func:`default_buckets`.
        use_graphs: False pads and runs ``fn`` eagerly on the static buffers (CPU, and
            debugging); :meth:`capture` then does nothing.
    """

    def __init__(
        self,
        fn: DecodeFn,
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device | str,
        scratch_block: int = 0,
        pad_context_len: int = 1,
        buckets: Sequence[int] | None = None,
        use_graphs: bool = True,
    ) -> None:
        self.fn = fn
        self.device = torch.device(device)
        self.buckets = sorted(set(buckets)) if buckets else default_buckets(max_num_seqs)
        if self.buckets[0] <= 0:
            raise ValueError(f"buckets must be positive, got {self.buckets}")
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.pad_context_len = pad_context_len
        self.use_graphs = use_graphs and self.device.type == "cuda"
        n, dev = self.buckets[-1], self.device
        # Plain (not inference-mode) tensors, so they may be updated in or out of inference mode.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.full((n,), pad_context_len, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket holding ``num_seqs`` rows, or None if the batch is too large."""
        for size in self.buckets:
            if size >= num_seqs:
                return size
        return None

    @torch.inference_mode()
    def capture(self, warmup_iters: int = 2) -> None:
        """Warm up and capture one graph per bucket, largest first, sharing one memory pool.

        Warm-up runs compile the Triton kernels and let the caching allocator settle before
        capture. All rows are padding during capture, so no KV slot is written.

        Args:
            warmup_iters: eager calls per bucket before its capture.
        """
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        self._pad_rows(0, self.buckets[-1])
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.buckets):
            args = self._static_args(size)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup_iters):
                    self.fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.fn(*args)
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode graphs (%s) in %.2fs", len(self._graphs), self.buckets, self.capture_seconds)

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step with ``fn``'s signature; returns logits ``[B, vocab]``.

        With graphs the result is a view of the graph's output buffer, valid until the
        next call. Batches larger than the largest bucket, or block tables wider than
        ``max_blocks_per_seq``, run ``fn`` eagerly on the given tensors.
        """
        num_seqs, width = block_tables.shape
        size = self.bucket_for(num_seqs)
        if size is None or width > self.max_blocks_per_seq or num_seqs == 0:
            return self.fn(input_ids, positions, block_tables, context_lens, slot_mapping)
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(block_tables, non_blocking=True)
        self.context_lens[:num_seqs].copy_(context_lens, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(slot_mapping, non_blocking=True)
        self._pad_rows(num_seqs, size)
        entry = self._graphs.get(size)
        if entry is None:
            return self.fn(*self._static_args(size))[:num_seqs]
        graph, out = entry
        graph.replay()
        return out[:num_seqs]

    def _static_args(self, size: int) -> tuple[torch.Tensor, ...]:
        return (
            self.input_ids[:size],
            self.positions[:size],
            self.block_tables[:size],
            self.context_lens[:size],
            self.slot_mapping[:size],
        )

    def _pad_rows(self, start: int, stop: int) -> None:
        """Make rows ``[start, stop)`` padding: token 0 at position 0, scratch block, no KV write."""
        if start >= stop:
            return
        self.input_ids[start:stop].zero_()
        self.positions[start:stop].zero_()
        self.block_tables[start:stop].fill_(self.scratch_block)
        self.context_lens[start:stop].fill_(self.pad_context_len)
        self.slot_mapping[start:stop].fill_(-1)
