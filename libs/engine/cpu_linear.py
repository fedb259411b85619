"""Linear layers on the CPU with their weights prepacked for oneDNN.

A decode step of a small batch reads every weight once, and how fast that goes depends
on the weight's memory layout: oneDNN's blocked layout, made once at load, runs the
SmolLM2 layers of a 16-row step in 13.7 ms in bfloat16 (on the CPU's AMX units) where
``F.linear`` on the plain layout takes 19.7 ms, and 33 against 42 ms in float32 (2
threads). A single float32 row (a one-sequence decode step) goes either way by the CPU:
MKL's GEMV on the plain layout was faster on an Intel Xeon (16 against 23 ms), oneDNN's
packed one on an AMD EPYC (22 against 46 ms). One or two rows go faster still through
the native small-batch kernel (:func:`libs.engine.kernels.cpu.linear`, the weight
streamed once on the plain layout): on a 2-core AMD EPYC, SmolLM2's 121 layers in
float32 took 20.2 ms for one row against oneDNN's 27.2 (2 threads), while oneDNN stays
ahead from four rows. :func:`pack_linears` times the ways on the model's own layers once
(one row: plain, packed, native; 2, 4 and 8 rows: packed, native) and keeps the fastest
for each row count.

:func:`pack_linears` turns a model's ``nn.Linear`` modules into :class:`PackedLinear`
(same parameters, same ``state_dict``, plus the packed copy as a buffer that is not
saved). Without oneDNN it leaves the model as it is.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from libs.engine.kernels import cpu as cpu_kernels

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
        native_rows: up to this many rows go through the native small-batch kernel
            (:func:`libs.engine.kernels.cpu.linear`; set by :func:`pack_linears` where
            that is faster; 0: never).
    """

    packed: torch.Tensor
    plain_single_row: bool = False
    native_rows: int = 0

    def pack(self) -> None:
        w = self.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS_HINT), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != self.packed.dtype:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] <= self.native_rows:
            out = cpu_kernels.linear(x, self.weight, self.bias)
            if out is not None:
                return out
        if self.plain_single_row and x.shape[0] == 1 and x.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        return self._packed(x)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.linear(x, self.weight, self.bias)
        if out is None:
            raise RuntimeError("the native linear kernel does not take these inputs")
        return out


# The most weight bytes the load-time timing reads a pass (a large model is timed on its first layers).
_TIMING_BYTES = 256 << 20
# Row counts the native small-batch kernel is timed at (a decode step of that many sequences).
_NATIVE_ROWS = (1, 2, 4, 8)


def _timed_layers(linears: list[PackedLinear]) -> list[PackedLinear]:
    """The first layers, up to ``_TIMING_BYTES`` of weights."""
    timed, size = [], 0
    for m in linears:
        if timed and size + m.weight.nbytes > _TIMING_BYTES:
            break
        timed.append(m)
        size += m.weight.nbytes
    return timed


@torch.inference_mode()
def _fastest(linears: list[PackedLinear], rows: int, ways: dict[str, Callable[..., torch.Tensor]]) -> str:
    """The way (a function of a layer and its input) that runs ``rows`` rows through
    ``linears`` fastest: the best of 3 passes each, taken in turns."""
    dtype = linears[0].weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features).to(dtype) for m in linears}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(3):
        for name, way in ways.items():
            t0 = time.perf_counter()
            for m in linears:
                way(m, inputs[m.in_features])
            best[name] = min(best[name], time.perf_counter() - t0)
    log.info("%d %s row(s) through %d linear layers: %s", rows, dtype, len(linears),
             ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in best.items()))
    return min(best, key=lambda name: best[name])


def _plain(m: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def _choose_ways(linears: list[PackedLinear]) -> None:
    """Set ``plain_single_row`` and ``native_rows`` of ``linears`` (one dtype) by timing them."""
    timed = _timed_layers(linears)
    plain = False
    if linears[0].weight.dtype == torch.float32:
        plain = _fastest(timed, 1, {"packed": PackedLinear._packed, "plain": _plain}) == "plain"
        for m in linears:
            m.plain_single_row = plain
    if not cpu_kernels.linear_usable():
        return
    native_rows = 0
    for rows in _NATIVE_ROWS:
        torch_way = _plain if rows == 1 and plain else PackedLinear._packed
        if _fastest(timed, rows, {"torch": torch_way, "native": PackedLinear._native}) != "native":
            break
        native_rows = rows
    for m in linears:
        m.native_rows = native_rows


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
    for dtype in (torch.float32, torch.bfloat16):
        of_dtype = [m for m in packed if m.weight.dtype == dtype]
        if of_dtype:
            _choose_ways(of_dtype)
    return len(packed)
