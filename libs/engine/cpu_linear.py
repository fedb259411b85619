"""Linear layers on the CPU with their weights prepacked for oneDNN.

A decode step of a small batch reads every weight once, and how fast that goes depends
on the weight's memory layout: oneDNN's blocked layout, made once at load, runs the
SmolLM2 layers of a 16-row step in 13.7 ms in bfloat16 (on the CPU's AMX units) where
``F.linear`` on the plain layout takes 19.7 ms, and 33 against 42 ms in float32 (2
threads). A single float32 row (a one-sequence decode step) goes either way by the CPU:
MKL's GEMV on the plain layout was faster on an Intel Xeon (16 against 23 ms), oneDNN's
packed one on an AMD EPYC (22 against 46 ms). :func:`pack_linears` times both on the
model's own layers once and keeps the faster.

:func:`pack_linears` turns a model's ``nn.Linear`` modules into :class:`PackedLinear`
(same parameters, same ``state_dict``, plus the packed copy as a buffer that is not
saved). Without oneDNN it leaves the model as it is.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# The row count oneDNN is told to expect; the packed weight serves any number of rows.
_PACK_ROWS_HINT = 16


def onednn_usable() -> bool:
    return bool(getattr(torch.backends, "mkldnn", None) and torch.backends.mkldnn.is_available())


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds its weight in oneDNN's packed layout (CPU only).

    Attributes:
        plain_single_row: a single float32 row goes through ``F.linear`` on the plain
            weight (set by :func:`pack_linears` where that is faster).
    """

    packed: torch.Tensor
    plain_single_row: bool = False

    def pack(self) -> None:
        w = self.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS_HINT), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != self.packed.dtype or (
                self.plain_single_row and x.shape[0] == 1 and x.dtype == torch.float32):
            return F.linear(x, self.weight, self.bias)
        return self._packed(x)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


# The most weight bytes the load-time timing reads a pass (a large model is timed on its first layers).
_TIMING_BYTES = 256 << 20


@torch.inference_mode()
def _plain_faster_for_one_row(linears: list[PackedLinear]) -> bool:
    """Whether one float32 row through ``linears`` is faster on the plain weights (MKL's
    GEMV) than on the packed ones: the best of 3 passes each, taken in turns, over the
    first layers up to ``_TIMING_BYTES`` of weights."""
    timed, size = [], 0
    for m in linears:
        if timed and size + m.weight.nbytes > _TIMING_BYTES:
            break
        timed.append(m)
        size += m.weight.nbytes
    linears = timed
    rows = {m.in_features: torch.randn(1, m.in_features) for m in linears}
    best = {"plain": float("inf"), "packed": float("inf")}
    for _ in range(3):
        for way in best:
            t0 = time.perf_counter()
            for m in linears:
                x = rows[m.in_features]
                F.linear(x, m.weight, m.bias) if way == "plain" else m._packed(x)
            best[way] = min(best[way], time.perf_counter() - t0)
    log.info("one float32 row through %d linear layers: %.1f ms plain, %.1f ms packed",
             len(linears), best["plain"] * 1e3, best["packed"] * 1e3)
    return best["plain"] < best["packed"]


def pack_linears(model: nn.Module) -> int:
    """Prepack every ``nn.Linear`` of ``model`` (on the CPU, float32 or bfloat16); returns how many."""
    if not onednn_usable():
        log.info("oneDNN is not available: linear layers use F.linear")
        return 0
    packed: list[PackedLinear] = []
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype in (torch.float32, torch.bfloat16):
            module.__class__ = PackedLinear
            module.pack()  # type: ignore[attr-defined]
            packed.append(module)  # type: ignore[arg-type]
    fp32 = [m for m in packed if m.weight.dtype == torch.float32]
    if fp32 and _plain_faster_for_one_row(fp32):
        for m in fp32:
            m.plain_single_row = True
    return len(packed)
