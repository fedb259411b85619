"""Fused element-wise kernels of the decoder layer: residual add + RMSNorm, rotary, SiLU * up.

In plain torch each of these is a handful of kernels (RMSNorm alone is about seven), and
a decode step of a small batch is bound by launches, not bytes: one Triton kernel each
takes ~40 launches per Llama layer down to ~10. The kernels cast to the activations'
dtype where the torch reference rounds (each torch op in bf16/fp16 computes in float32
and rounds); in float32 they agree with it to float32 rounding. In bf16 on the GPU the
compiler may drop an intermediate bf16 round trip (rotary: ~20% of elements one bf16
step from the op-by-op reference on an H100), so fused and unfused agree to a step;
the engine-vs-transformers GPU check passes with them.

Every function has a ``*_ref`` torch version; the dispatching function uses Triton when
the tensors are on CUDA (or under ``TRITON_INTERPRET=1``, for the tests), the native C
kernels of :mod:`libs.engine.kernels.cpu` for float32 on the CPU, and the reference
otherwise. All kernels are CUDA-graph safe (no host sync, shapes from shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from libs.engine.kernels import cpu
from libs.engine.kernels.paged_attention import INTERPRET, tl, triton


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like ``t`` (CUDA, or the CPU interpreter)."""
    return triton is not None and (t.is_cuda or INTERPRET)


# ---------------------------------------------------------------- references


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (in x's dtype; ``r = x`` without residual), ``weight * rmsnorm(r)``.

    The norm runs in float32 and is cast back before the weight multiply, as transformers'
    ``LlamaRMSNorm`` does. Returns ``(normed, r)``.
    """
    r = x if residual is None else x + residual
    rf = r.float()
    rf = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * rf.to(r.dtype), r


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary of ``q`` [T, Hq, D] and ``k`` [T, Hkv, D]; tables ``[P, D]`` float32."""
    c = cos.index_select(0, positions).to(q.dtype)[:, None, :]
    s = sin.index_select(0, positions).to(q.dtype)[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [T, 2I] (gate first); -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- dispatch


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one kernel.

    Args:
        x: ``[T, N]`` input (rows contiguous).
        residual: ``[T, N]`` running residual, or None (the first layer: ``x`` is it).
            With Triton it is updated in place to ``x + residual``.
        weight: ``[N]`` norm weight.
        eps: variance epsilon.
        out: optional ``[T, N]`` tensor (rows with unit stride) for the normed rows.

    Returns:
        ``(weight * rmsnorm(x + residual), x + residual)``, both in x's dtype.
    """
    if not triton_usable(x):
        native = cpu.add_rms_norm(x, residual, weight, eps) if out is None else None
        normed, r = native if native is not None else add_rms_norm_ref(x, residual, weight, eps)
        return (normed if out is None else out.copy_(normed)), r
    return _add_rms_norm_triton(x, residual, weight, eps, out)


def rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary of ``q`` [T, Hq, D] and ``k`` [T, Hkv, D] at ``positions`` [T] (in place with Triton).

    ``q`` and ``k`` may be strided views (slices of one fused QKV output); their last
    dimension must be contiguous. ``cos``/``sin`` are the ``[P, D]`` float32 tables.

    Returns:
        The rotated ``(q, k)``: the same tensors with Triton, new ones otherwise.
    """
    if not triton_usable(q):
        native = cpu.rotary_(q, k, positions, cos, sin)
        return native if native is not None else rotary_ref(q, k, positions, cos, sin)
    _rotary_triton(q, k, positions, cos, sin)
    return q, k


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [T, 2I] in one kernel; -> [T, I] in its dtype (into ``out`` if given)."""
    if not triton_usable(gate_up):
        ref = (cpu.silu_mul(gate_up) if out is None else None)
        if ref is None:
            ref = silu_mul_ref(gate_up)
        return ref if out is None else out.copy_(ref)
    return _silu_mul_triton(gate_up, out)


# ---------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr,
        stride_x, stride_res, stride_out,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One row: r = x + res (rounded, stored back to res), out = w * (r * rstd) in x's dtype."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_N)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_res + offs, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(
        base, stride_h, offs_d, c, s,
        NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """Rotate the [NUM_HEADS, 2 * HALF] rows at ``base`` in place (rotate-half layout)."""
        offs_h = tl.arange(0, BLOCK_H)
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
        lo_ptrs = base + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(lo_ptrs, mask=mask, other=0.0)
        x2 = tl.load(lo_ptrs + HALF, mask=mask, other=0.0)
        dt = x1.dtype
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        # Cast where torch rounds: each product, then the sum (q*cos + rotate_half(q)*sin).
        lo = (x1f * c).to(dt).to(tl.float32) - (x2f * s).to(dt).to(tl.float32)
        hi = (x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)
        tl.store(lo_ptrs, lo.to(dt), mask=mask)
        tl.store(lo_ptrs + HALF, hi.to(dt), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
        NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """One token: its q and k heads rotated by the angles of its position."""
        tok = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)
        dmask = offs_d < HALF
        # The tables hold cat(freqs, freqs): the first half has every angle. Cast to the
        # activations' dtype first, as the reference does.
        c = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0)
        s = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0)
        c = c.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
        s = s.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + tok * stride_qt, stride_qh, offs_d, c, s, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
        _rotate_heads(k_ptr + tok * stride_kt, stride_kh, offs_d, c, s, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)

    @triton.jit
    def _silu_mul_kernel(
        x_ptr, out_ptr, stride_x, stride_out, n_cols,
        BLOCK_N: tl.constexpr,
    ):
        """Columns [pid1 * BLOCK_N, ...) of one row: out = silu(gate) * up, rounded like torch."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_cols
        g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        out = act.to(tl.float32) * u.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def _add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"add_rms_norm wants [T, N] rows with unit stride and weight [N]; got {tuple(x.shape)}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} does not match x {tuple(x.shape)}")
    if x.shape[0] == 0:
        return out, (x if residual is None else residual)
    res = x if residual is None else residual
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    block = triton.next_power_of_2(x.shape[1])
    _add_rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), x.shape[1], eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=_norm_warps(block),
    )
    return out, res


def _rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"rotary: q {tuple(q.shape)} / k {tuple(k.shape)} need unit stride on the last dim")
    if head_dim % 2 or cos.shape[1] != head_dim or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit head_dim {head_dim}")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )


def _silu_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_mul wants [T, 2I] with unit column stride, got {tuple(gate_up.shape)}")
    num_tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, cols, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (num_tokens, cols) or out.stride(1) != 1:
        raise ValueError(f"out {tuple(out.shape)} is not [{num_tokens}, {cols}] with unit column stride")
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(cols))
    _silu_mul_kernel[(num_tokens, triton.cdiv(cols, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), cols, BLOCK_N=block, num_warps=4,
    )
    return out
