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
ahead from four rows. A third copy of the weight, packed at load into panels of 16
output columns (:func:`libs.engine.kernels.cpu.linear_panels`: each weight read once for
up to 16 rows, their products kept in registers; in bfloat16 with the CPU's bf16 dot
product, pairs of k at a time), is faster from a few rows to a few dozen: on that EPYC,
SmolLM2's 121 layers with 16 float32 rows (a 16-sequence decode step) took 24-27 ms
against oneDNN's 33-41 ms, while the native kernel kept one and two rows.
:func:`pack_linears` times the ways on the model's own layers once (at 1, 2, 4, ... 64
rows: torch's best, the native kernel up to 8 rows, the panels) and keeps the fastest for
each row count. The panels cost the weight's size again in memory: they are made only
while that is at most a quarter of the memory available at load, and dropped where they
win at no row count.

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
        panel_rows: up to this many rows go through the weight's panels
            (:func:`libs.engine.kernels.cpu.linear_panels`; set by :func:`pack_linears`
            where that is faster; 0: never, and no panels are kept). Checked after
            ``native_rows``.
    """

    packed: torch.Tensor
    panels: torch.Tensor | None = None
    plain_single_row: bool = False
    native_rows: int = 0
    panel_rows: int = 0

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
        if x.shape[0] <= self.panel_rows:
            out = self._panels(x)
            if out is not None:
                return out
        if self.plain_single_row and x.shape[0] == 1 and x.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        return self._packed(x)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def _panels(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.panels is None:
            return None
        return cpu_kernels.linear_panels(x, self.panels, self.out_features, self.bias)

    def _panelled(self, x: torch.Tensor) -> torch.Tensor:
        out = self._panels(x)
        if out is None:
            raise RuntimeError("the panel linear kernel does not take these inputs")
        return out

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        out = cpu_kernels.linear(x, self.weight, self.bias)
        if out is None:
            raise RuntimeError("the native linear kernel does not take these inputs")
        return out


# The most weight bytes the load-time timing reads a pass (a large model is timed on its first layers).
_TIMING_BYTES = 256 << 20
# Row counts the native small-batch kernel is timed at (a decode step of that many sequences).
_NATIVE_ROWS = (1, 2, 4, 8)
# Row counts the panel kernel is timed at (while it or the native kernel wins).
_PANEL_ROWS = (1, 2, 4, 8, 16, 32, 64)
# The panels (a copy of the weights) are made only while they take at most this share of
# the memory available at load; a model that large is left to oneDNN and the native kernel.
_PANEL_MEMORY_SHARE = 0.25


def _memory_available() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _panels_fit(linears: list[PackedLinear]) -> bool:
    """Whether a panel copy of ``linears``' weights fits :data:`_PANEL_MEMORY_SHARE` of the
    memory available (a weight shared by two layers, a tied LM head, counts once a layer)."""
    size = sum(m.weight.nbytes for m in linears)
    available = _memory_available()
    if available is not None and size > _PANEL_MEMORY_SHARE * available:
        log.info("no weight panels: %.1f GB of %s weights against %.1f GB available",
                 size / 1e9, linears[0].weight.dtype, available / 1e9)
        return False
    return True


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
    """Set ``plain_single_row``, ``native_rows`` and ``panel_rows`` of ``linears`` (one
    dtype) by timing them on their first layers.

    At 1, 2, 4, ... 64 rows the fastest of torch's way (oneDNN's packed weight; the plain
    weight for one row when that is faster), the native kernel (up to 8 rows) and the
    panels (float32; bfloat16 where the CPU has AVX512-BF16) is found. The native kernel
    takes the rows up to the last of the first row counts it wins; the panels take the
    rows up to the last row count they win, above the native kernel's; they are dropped
    when they win none. (Every row count is timed: one a few percent off by the
    machine's noise does not end the search.)
    """
    timed = _timed_layers(linears)
    float32 = linears[0].weight.dtype == torch.float32
    plain = False
    if float32:
        plain = _fastest(timed, 1, {"packed": PackedLinear._packed, "plain": _plain}) == "plain"
        for m in linears:
            m.plain_single_row = plain
    if not cpu_kernels.linear_usable():
        return
    if cpu_kernels.panels_usable(linears[0].weight.dtype) and _panels_fit(linears):
        for m in linears:
            m.panels = cpu_kernels.pack_panels(m.weight.detach())
    with_panels = all(m.panels is not None for m in linears)
    winners: dict[int, str] = {}
    for rows in sorted(set(_NATIVE_ROWS) | (set(_PANEL_ROWS) if with_panels else set())):
        ways: dict[str, Callable[..., torch.Tensor]] = {
            "torch": _plain if rows == 1 and plain else PackedLinear._packed}
        if rows <= _NATIVE_ROWS[-1]:
            ways["native"] = PackedLinear._native
        if with_panels:
            ways["panels"] = PackedLinear._panelled
        winners[rows] = _fastest(timed, rows, ways)
    native_rows = 0
    for rows, best in winners.items():
        if best != "native":
            break
        native_rows = rows
    panel_rows = max((rows for rows, best in winners.items() if best == "panels" and rows > native_rows), default=0)
    for m in linears:
        m.native_rows, m.panel_rows = native_rows, panel_rows
        if panel_rows == 0:
            m.panels = None
    log.info("%s linear layers: native kernel up to %d row(s), panels up to %d, oneDNN above",
             linears[0].weight.dtype, native_rows, panel_rows)


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
