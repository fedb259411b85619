"""Native CPU kernels: C sources built with the machine's C compiler at first use.

The engine's CPU hot spots that torch ops serve badly are written in plain C
(``*.c`` beside this file) and called through ``ctypes`` on the tensors' memory: no
torch headers, so a build takes about a second, not a minute. A build is cached under
``$FLOWKV_CACHE_DIR/kernels`` (default ``~/.cache/flowkv/kernels``) by a hash of the
source, the compiler and the CPU's flags (it is built with ``-march=native``); node
processes that start together build it once between them (the first rename wins).

Without a C compiler, or with ``FLOWKV_CPU_KERNELS=0``, :func:`native` returns None and
the engine keeps its torch paths: slower, same results.

The kernels use OpenMP and link the same ``libgomp.so.1`` soname that torch's CPU build
loads, so they share torch's thread pool and ``torch.set_num_threads`` sizes both.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger(__name__)

_SOURCES = ("paged_attention.c", "prefill_attention.c", "layer_ops.c", "linear.c")
_HEADERS = ("bf16.h", "pool_geometry.h")
# Compiled with -ffast-math (so expf vectorises through libmvec) but linked without it:
# linking with it adds crtfastmath.o, whose constructor turns on flush-to-zero for the
# whole process when the library loads (a denormal like 5e-324 would then read as 0).
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
_LDFLAGS = ["-shared", "-fopenmp", "-lmvec", "-lm"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


class PoolGeometry(ctypes.Structure):
    _fields_ = [
        ("block_stride", ctypes.c_int64),
        ("layer_offset", ctypes.c_int64),
        ("v_offset", ctypes.c_int64),
        ("block_size", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
    ]


def enabled() -> bool:
    """Whether native kernels may be used (``FLOWKV_CPU_KERNELS=0`` turns them off)."""
    return os.environ.get("FLOWKV_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def native() -> ctypes.CDLL | None:
    """The built kernel library, building it on first use; None where it cannot be had."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _lib = _load() if enabled() else None
            _tried = True
    return _lib


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _remove_stale(out_dir: str, keep: str) -> None:
    """Delete the builds of other sources or flags (a process still using one keeps its mapping)."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith("flowkv_cpu_") and name.endswith(".so") and path != keep:
            try:
                os.unlink(path)
            except OSError:
                pass


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler: the CPU engine runs its torch paths (slower, same results)")
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join([cc, *_CFLAGS, *_LDFLAGS, _cpu_flags()]).encode())
    from libs.engine.loader import cache_dir

    out_dir = os.path.join(cache_dir(), "kernels")
    target = os.path.join(out_dir, f"flowkv_cpu_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(target):
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        with tempfile.TemporaryDirectory(dir=out_dir) as objdir:
            objects = [os.path.join(objdir, s[: -len(".c")] + ".o") for s in _SOURCES]
            cmds = [[cc, *_CFLAGS, "-c", os.path.join(here, s), "-o", o] for s, o in zip(_SOURCES, objects)]
            cmds.append([cc, *objects, "-o", tmp, *_LDFLAGS])
            try:
                for cmd in cmds:
                    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
                os.replace(tmp, target)
                _remove_stale(out_dir, keep=target)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or exc
                log.warning("building the CPU kernels failed (%s); using the torch paths", detail)
                if os.path.exists(tmp):
                    os.unlink(tmp)
                return None
    torch.get_num_threads()  # torch's OpenMP runtime is loaded before ours resolves against it
    lib = ctypes.CDLL(target)
    for name in ("flowkv_paged_decode_f32", "flowkv_paged_decode_bf16"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, PoolGeometry, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
        ]
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.flowkv_write_kv.restype = None
    lib.flowkv_write_kv.argtypes = [P, I64, P, I64, P, I64, I64, I64, I64, I64, I64, P, I64]
    for suffix in ("f32", "bf16"):
        getattr(lib, f"flowkv_add_rms_norm_{suffix}").restype = None
        getattr(lib, f"flowkv_add_rms_norm_{suffix}").argtypes = [P, I64, P, I64, P, P, I64, I64, I64, F, I]
        getattr(lib, f"flowkv_rotary_{suffix}").restype = None
        getattr(lib, f"flowkv_rotary_{suffix}").argtypes = [P, I64, I, P, I64, I, I, P, I64, P, P]
        getattr(lib, f"flowkv_silu_mul_{suffix}").restype = None
        getattr(lib, f"flowkv_silu_mul_{suffix}").argtypes = [P, I64, P, I64, I64, I64]
        getattr(lib, f"flowkv_linear_{suffix}").restype = I
        getattr(lib, f"flowkv_linear_{suffix}").argtypes = [P, I64, I64, P, I64, I64, P, P, I64]
    lib.flowkv_linear_available.restype = I
    lib.flowkv_linear_available.argtypes = []
    for name in ("flowkv_paged_prefill_f32", "flowkv_paged_prefill_bf16"):
        getattr(lib, name).restype = I
        getattr(lib, name).argtypes = [P, I64, P, PoolGeometry, P, I64, P, P, P, I, I, F, P, I64]
    lib.flowkv_prefill_available.restype = I
    lib.flowkv_prefill_available.argtypes = []
    for suffix in ("f32", "bf16"):
        getattr(lib, f"flowkv_pack_panels_{suffix}").restype = None
        getattr(lib, f"flowkv_pack_panels_{suffix}").argtypes = [P, I64, I64, P]
        getattr(lib, f"flowkv_linear_panels_{suffix}").restype = I
        getattr(lib, f"flowkv_linear_panels_{suffix}").argtypes = [P, I64, I64, P, I64, I64, P, P, I64]
    lib.flowkv_panels_bf16_available.restype = I
    lib.flowkv_panels_bf16_available.argtypes = []
    return lib


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _rows_ok(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype the kernels take (float32, bfloat16), last dimension contiguous."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX:
        return False
    for t in tensors:  # a plain loop: this runs for every kernel call of a decode step
        if t.dtype != dtype or not t.is_cpu or t.stride(-1) != 1:
            return False
    return True


@functools.cache  # looked up for every kernel call of a decode step
def _fn(lib: ctypes.CDLL, name: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    return getattr(lib, f"flowkv_{name}_{_SUFFIX[dtype]}")


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight * rmsnorm(x + residual), x + residual)`` of ``x`` [T, N]; the sum is written
    into ``residual`` (a new tensor when it is None). None: not for these inputs."""
    lib = native()
    if lib is None or x.dim() != 2 or not _rows_ok(x, weight) or (residual is not None and not _rows_ok(residual)):
        return None
    rows, cols = x.shape
    r = torch.empty_like(x) if residual is None else residual
    out = torch.empty((rows, cols), dtype=x.dtype)
    _fn(lib, "add_rms_norm", x.dtype)(x.data_ptr(), x.stride(0), r.data_ptr(), r.stride(0), weight.contiguous().data_ptr(),
                                out.data_ptr(), out.stride(0), rows, cols, float(eps), int(residual is not None))
    return out, r


def rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotary of ``q`` [T, Hq, D] and ``k`` [T, Hkv, D] in place (heads contiguous within a
    token). None: not for these inputs."""
    lib = native()
    if lib is None or not _rows_ok(q, k) or not _rows_ok(cos, sin) or cos.dtype != torch.float32 \
            or positions.dtype != torch.int64:
        return None
    dim = q.shape[-1]
    if q.stride(1) != dim or k.stride(1) != dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    pos = positions.contiguous()
    _fn(lib, "rotary", q.dtype)(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1], dim,
                          pos.data_ptr(), q.shape[0], cos.data_ptr(), sin.data_ptr())
    return q, k


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``gate_up`` [T, 2I]. None: not for these inputs."""
    lib = native()
    if lib is None or gate_up.dim() != 2 or not _rows_ok(gate_up):
        return None
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype)
    _fn(lib, "silu_mul", gate_up.dtype)(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), rows, inter)
    return out


def linear_usable() -> bool:
    """Whether :func:`linear` can run here (the library is built for a CPU with AVX-512)."""
    lib = native()
    return lib is not None and bool(lib.flowkv_linear_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for ``x`` [M, K] of a few rows (a decode step), streaming the
    weight [N, K] once; float32 or bfloat16. None: not for these inputs."""
    lib = native()
    if lib is None or x.dim() != 2 or not _rows_ok(x, weight) or not weight.is_contiguous() \
            or weight.dim() != 2 or x.shape[1] != weight.shape[1] \
            or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
        return None
    rows, n_out = x.shape[0], weight.shape[0]
    out = torch.empty((rows, n_out), dtype=x.dtype)
    rc = _fn(lib, "linear", x.dtype)(x.data_ptr(), x.stride(0), rows, weight.data_ptr(), n_out, weight.shape[1],
                                     None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0))
    return out if rc == 0 else None


def _panel_size(dtype: torch.dtype, n_out: int, k_in: int) -> int:
    """Elements of a weight's panels: 16 columns a panel; bfloat16 rounds K up to pairs."""
    return ((n_out + 15) // 16) * 16 * (k_in if dtype == torch.float32 else 2 * ((k_in + 1) // 2))


def panels_usable(dtype: torch.dtype) -> bool:
    """Whether :func:`linear_panels` runs for ``dtype`` here (float32 with AVX-512;
    bfloat16 with AVX512-BF16 as well)."""
    lib = native()
    if lib is None or not lib.flowkv_linear_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(lib.flowkv_panels_bf16_available()))


def pack_panels(weight: torch.Tensor) -> torch.Tensor | None:
    """A weight [N, K] repacked for :func:`linear_panels`: panels of 16 output columns
    (float32: ``[ceil(N / 16)][K][16]``; bfloat16: pairs of k side by side,
    ``[ceil(N / 16)][ceil(K / 2)][16][2]``), a copy, padded with zeros. None where the
    kernel cannot run (see :func:`panels_usable`; not a contiguous CPU matrix)."""
    if weight.dim() != 2 or not weight.is_contiguous() or not weight.is_cpu or not panels_usable(weight.dtype):
        return None
    n_out, k_in = weight.shape
    panels = torch.empty(_panel_size(weight.dtype, n_out, k_in), dtype=weight.dtype)
    _fn(native(), "pack_panels", weight.dtype)(weight.data_ptr(), n_out, k_in, panels.data_ptr())
    return panels


def linear_panels(x: torch.Tensor, panels: torch.Tensor, n_out: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for ``x`` [M, K] of the panels' dtype, the weight given as
    its :func:`pack_panels`; fastest for a few to a few dozen rows. None: not for these inputs."""
    lib = native()
    if lib is None or x.dim() != 2 or x.dtype != panels.dtype or x.dtype not in _SUFFIX or not x.is_cpu \
            or x.stride(1) != 1 or panels.numel() != _panel_size(x.dtype, n_out, x.shape[1]) \
            or (bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous())):
        return None
    rows = x.shape[0]
    out = torch.empty((rows, n_out), dtype=x.dtype)
    if rows == 0:
        return out
    rc = _fn(lib, "linear_panels", x.dtype)(x.data_ptr(), x.stride(0), rows, panels.data_ptr(), n_out, x.shape[1],
                                            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0))
    return out if rc == 0 else None


def write_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Store ``k[t]``, ``v[t]`` [T, Hkv, D] at slot ``slot_mapping[t]`` of ``layer`` (slots < 0
    skipped). False: not for these inputs (the caller uses torch)."""
    lib = native()
    if lib is None or not pool.is_contiguous() or pool.device.type != "cpu" or k.dtype != pool.dtype \
            or v.dtype != pool.dtype or slot_mapping.dtype != torch.int64 or k.dim() != 3 or v.dim() != 3:
        return False
    heads, dim = pool.shape[4], pool.shape[5]
    if k.shape[1:] != (heads, dim) or v.shape[1:] != (heads, dim) \
            or k.stride(2) != 1 or k.stride(1) != dim or v.stride(2) != 1 or v.stride(1) != dim:
        return False
    size = pool.element_size()
    slots = slot_mapping.contiguous()
    lib.flowkv_write_kv(k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size, pool.data_ptr(),
                        pool.stride(0) * size, layer * pool.stride(1) * size, pool.stride(2) * size, pool.shape[3],
                        pool.stride(3) * size, heads * dim * size, slots.data_ptr(), k.shape[0])
    return True


def prefill_tables(seqs: list[tuple[int, int, int, torch.Tensor]]) -> tuple[torch.Tensor, ...] | None:
    """The int32 arrays :func:`paged_prefill_attention` takes for a batch of prompt chunks,
    each ``(q_start, q_len, context_start, block_ids)``: (block tables padded to the
    longest, q starts, q lengths, context starts). None where the kernel cannot run."""
    lib = native()
    if lib is None or not lib.flowkv_prefill_available() or not seqs:
        return None
    width = max(int(ids.numel()) for *_, ids in seqs)
    tables = torch.zeros((len(seqs), max(1, width)), dtype=torch.int32)
    for i, (*_, ids) in enumerate(seqs):
        tables[i, : ids.numel()] = ids.to(torch.int32)
    meta = torch.tensor([[q0, n, c] for q0, n, c, _ in seqs], dtype=torch.int32).t().contiguous()
    return tables, meta[0], meta[1], meta[2]


def paged_prefill_attention(
    q: torch.Tensor, pool: torch.Tensor, layer: int, tables: tuple[torch.Tensor, ...], scale: float,
) -> torch.Tensor | None:
    """Causal attention of a batch of prompt chunks ``q`` [T, Hq, D] (float32, or bfloat16
    with a bfloat16 pool; float32 math either way) over the pool in place (their own K/V
    already written there) -> [T, Hq, D] in q's dtype; ``tables`` from
    :func:`prefill_tables`. None: not for these inputs (the caller runs SDPA)."""
    lib = native()
    if lib is None or pool.dtype not in _SUFFIX or q.dtype != pool.dtype or not pool.is_contiguous() \
            or q.dim() != 3 or q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        return None
    block_tables, q_start, q_len, ctx_start = tables
    out = torch.empty(q.shape, dtype=q.dtype)
    geom = PoolGeometry(
        block_stride=pool.stride(0), layer_offset=layer * pool.stride(1), v_offset=pool.stride(2),
        block_size=pool.shape[3], kv_heads=pool.shape[4], head_dim=pool.shape[5],
    )
    rc = _fn(lib, "paged_prefill", q.dtype)(
        q.data_ptr(), q.stride(0), pool.data_ptr(), geom, block_tables.data_ptr(), block_tables.shape[1],
        q_start.data_ptr(), q_len.data_ptr(), ctx_start.data_ptr(), q_start.numel(), q.shape[1], float(scale),
        out.data_ptr(), out.stride(0))
    if rc == -1:
        return None
    if rc != 0:
        raise RuntimeError(f"native paged prefill attention failed ({rc})")
    return out


def paged_decode_attention(
    q: torch.Tensor, pool: torch.Tensor, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Decode attention of ``q`` [B, Hq, D] over the pool in place -> [B, Hq, D] (q's dtype).

    Returns None when the native kernel cannot take these inputs (no library, a layout
    or dtype it does not handle): the caller falls back to torch.
    """
    lib = native()
    if lib is None or pool.dtype not in (torch.float32, torch.bfloat16) or not pool.is_contiguous():
        return None
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = pool.shape[3], pool.shape[4]
    if head_dim > 256 or num_heads % kv_heads or num_heads // kv_heads > 32:
        return None
    qf = q.float().contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(qf)
    geom = PoolGeometry(
        block_stride=pool.stride(0), layer_offset=layer * pool.stride(1), v_offset=pool.stride(2),
        block_size=block_size, kv_heads=kv_heads, head_dim=head_dim,
    )
    fn = lib.flowkv_paged_decode_f32 if pool.dtype == torch.float32 else lib.flowkv_paged_decode_bf16
    rc = fn(qf.data_ptr(), pool.data_ptr(), geom, tables.data_ptr(), tables.shape[1], lens.data_ptr(),
            num_seqs, num_heads, float(scale), out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"native paged decode attention failed ({rc})")
    return out if q.dtype == torch.float32 else out.to(q.dtype)
