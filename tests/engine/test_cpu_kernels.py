"""The native CPU kernels (libs/engine/kernels/cpu) against their torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from libs.engine.attention import decode_attention_torch
from libs.engine.kernels import cpu
from libs.engine.kernels.fused import add_rms_norm_ref, rotary_ref, silu_mul_ref

pytestmark = pytest.mark.skipif(cpu.native() is None, reason="no C compiler: the native CPU kernels are not built")


# (block_size, kv_heads, head_dim, heads): SmolLM2's shapes; head_dim 128 with groups of 4
# and of 1 and blocks shorter and longer than the kernel's 16-key tiles; a head_dim the
# vectorised path does not take (the scalar loop).
SHAPES = [(16, 3, 64, 9), (8, 2, 128, 8), (32, 4, 128, 4), (16, 2, 80, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs", [1, 5, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-d{}-h{}".format(*s))
def test_paged_decode_attention_matches_the_torch_path(dtype, num_seqs, shape):
    gen = torch.Generator().manual_seed(num_seqs)
    block_size, kv_heads, head_dim, heads = shape
    blocks, layers, width = 90, 4, 12
    pool = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randint(0, blocks, (num_seqs, width), generator=gen, dtype=torch.int32)
    lens = torch.randint(1, width * block_size + 1, (num_seqs,), generator=gen, dtype=torch.int32)
    lens[0] = 1  # one key: softmax of a single score
    lens[-1] = width * block_size  # every block full
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(dtype)
    for layer in (0, layers - 1):
        ref = decode_attention_torch(q, pool, layer, tables, lens, 0.125)
        out = cpu.paged_decode_attention(q, pool, layer, tables, lens, 0.125)
        assert out is not None and out.dtype == dtype and out.shape == ref.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "bs{}-kv{}-d{}-h{}".format(*s))
def test_paged_prefill_attention_matches_sdpa(shape, dtype):
    """A batch of prompt chunks in one call: fresh prompts (one token, shorter than a tile,
    several tiles), chunks after a cached context (the causal diagonal to the lower right,
    query tiles not aligned with key tiles), the queries a strided view of a fused QKV.
    bfloat16 against SDPA in float32 on the same bfloat16 inputs: one rounding apart."""
    from libs.engine.attention import PrefillMetadata, PrefillSeq, prefill_attention

    gen = torch.Generator().manual_seed(7)
    block_size, kv_heads, head_dim, heads = shape
    blocks, layers = 200, 3
    pool = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    cases = [(0, 1), (0, 7), (0, 100), (5, 20), (100, 37), (33, 1), (250, 16)]  # (cached, chunk)
    perm, seqs, start = torch.randperm(blocks, generator=gen), [], 0
    for ctx, n in cases:
        used = sum(-(-(c + m) // block_size) for c, m in cases[: len(seqs)])
        seqs.append(PrefillSeq(q_start=start, q_len=n, context_start=ctx,
                               block_ids=perm[used : used + -(-(ctx + n) // block_size)]))
        start += n
    qkv = torch.randn(start, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : heads * head_dim].view(start, heads, head_dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    tables = cpu.prefill_tables([(s.q_start, s.q_len, s.context_start, s.block_ids) for s in seqs])
    assert tables is not None
    for layer in (0, layers - 1):
        out = cpu.paged_prefill_attention(q, pool, layer, tables, 0.125)
        if head_dim % 16:
            assert out is None  # not a multiple of 16: SDPA instead
            continue
        assert out is not None and out.shape == q.shape and out.dtype == dtype
        for s in seqs:
            total = s.context_start + s.q_len
            kv = pool[:, layer].index_select(0, s.block_ids).float()
            k = kv[:, 0].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
            v = kv[:, 1].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0)
            mask = torch.ones(s.q_len, total, dtype=torch.bool).tril(diagonal=s.context_start)
            qs = q[s.q_start : s.q_start + s.q_len].float().transpose(0, 1).unsqueeze(0)
            want = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)[0].transpose(0, 1)
            torch.testing.assert_close(out[s.q_start : s.q_start + s.q_len].float(), want, atol=tol, rtol=tol)
        # the engine's entry point takes the kernel: the same result, bit for bit
        meta = PrefillMetadata(slot_mapping=torch.zeros(start, dtype=torch.int64), seqs=seqs)
        k_own = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(start, kv_heads, head_dim)
        v_own = qkv[:, (heads + kv_heads) * head_dim :].view(start, kv_heads, head_dim)
        torch.testing.assert_close(prefill_attention(q, k_own, v_own, pool, layer, meta, 0.125), out, atol=0, rtol=0)
        assert meta.cpu_tables


def test_paged_prefill_attention_inputs_it_does_not_take_fall_back():
    pool = torch.randn(4, 1, 2, 16, 3, 64).bfloat16()
    tables = cpu.prefill_tables([(0, 5, 0, torch.tensor([2]))])
    assert tables is not None
    assert cpu.paged_prefill_attention(torch.randn(5, 9, 64), pool, 0, tables, 0.125) is None  # dtypes differ
    assert cpu.paged_prefill_attention(torch.randn(5, 9, 64).half(), pool.half(), 0, tables, 0.125) is None
    assert cpu.paged_prefill_attention(torch.randn(9, 5, 64).bfloat16().transpose(0, 1), pool, 0, tables, 0.125) is None


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_layer_ops_match_their_references(rows):
    gen = torch.Generator().manual_seed(rows)
    x, residual, weight = (torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen),
                           torch.randn(576, generator=gen))
    want_normed, want_sum = add_rms_norm_ref(x, residual, weight, 1e-5)
    got = cpu.add_rms_norm(x, residual.clone(), weight, 1e-5)
    assert got is not None
    torch.testing.assert_close(got[0], want_normed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want_sum, atol=0, rtol=0)
    first = cpu.add_rms_norm(x, None, weight, 1e-5)
    assert first is not None
    torch.testing.assert_close(first[0], add_rms_norm_ref(x, None, weight, 1e-5)[0], atol=1e-5, rtol=1e-5)

    # q and k as the model has them: strided views of one fused QKV output.
    qkv = torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=gen)
    q, k = qkv[:, :576].view(rows, 9, 64), qkv[:, 576:768].view(rows, 3, 64)
    positions = torch.randint(0, 500, (rows,), generator=gen)
    angles = torch.randn(500, 64, generator=gen)
    want_q, want_k = rotary_ref(q, k, positions, angles.cos(), angles.sin())
    assert cpu.rotary_(q, k, positions, angles.cos(), angles.sin()) is not None
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)

    gate_up = torch.randn(rows, 2 * 1536, generator=gen)
    got_silu = cpu.silu_mul(gate_up)
    assert got_silu is not None
    torch.testing.assert_close(got_silu, silu_mul_ref(gate_up), atol=1e-5, rtol=1e-5)


def test_inputs_the_kernels_do_not_take_fall_back():
    x = torch.randn(3, 8, dtype=torch.float64)
    assert cpu.add_rms_norm(x, None, torch.ones(8, dtype=torch.float64), 1e-5) is None
    assert cpu.silu_mul(torch.randn(4, 6)[:, ::2]) is None  # last dimension not contiguous


@pytest.mark.parametrize("rows", [1, 9, 300])
def test_bf16_layer_ops_round_where_the_reference_rounds(rows):
    gen = torch.Generator().manual_seed(100 + rows)
    bf = torch.bfloat16
    x, residual, weight = (torch.randn(rows, 576, generator=gen).to(bf), torch.randn(rows, 576, generator=gen).to(bf),
                           torch.randn(576, generator=gen).to(bf))
    want_normed, want_sum = add_rms_norm_ref(x, residual, weight, 1e-5)
    got = cpu.add_rms_norm(x, residual.clone(), weight, 1e-5)
    assert got is not None and got[0].dtype == bf
    torch.testing.assert_close(got[1], want_sum, atol=0, rtol=0)
    # The sum of squares is added in another order than torch's: at most one bf16 step apart.
    torch.testing.assert_close(got[0].float(), want_normed.float(), atol=0, rtol=2 ** -7)

    qkv = torch.randn(rows, 960, generator=gen).to(bf)
    q, k = qkv[:, :576].view(rows, 9, 64), qkv[:, 576:768].view(rows, 3, 64)
    positions = torch.randint(0, 500, (rows,), generator=gen)
    angles = torch.randn(500, 64, generator=gen)
    want_q, want_k = rotary_ref(q, k, positions, angles.cos(), angles.sin())
    assert cpu.rotary_(q, k, positions, angles.cos(), angles.sin()) is not None
    torch.testing.assert_close(q, want_q, atol=0, rtol=0)
    torch.testing.assert_close(k, want_k, atol=0, rtol=0)

    gate_up = torch.randn(rows, 2 * 1536, generator=gen).to(bf)
    got_silu = cpu.silu_mul(gate_up)
    assert got_silu is not None and got_silu.dtype == bf
    torch.testing.assert_close(got_silu.float(), silu_mul_ref(gate_up).float(), atol=0, rtol=2 ** -7)


def test_loading_the_kernels_keeps_denormals():
    """The library is built with -ffast-math but must not switch the process to
    flush-to-zero (linking with -ffast-math would, through crtfastmath.o)."""
    assert cpu.native() is not None
    tiny = 5e-324  # the smallest double, a denormal
    assert tiny * 1.0 > 0.0
    assert float(torch.tensor([1e-40], dtype=torch.float32) * 1.0) > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_the_torch_scatter(dtype):
    from libs.engine.kernels.kv_write import write_kv_ref

    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(20, 4, 2, 16, 3, 64, generator=gen).to(dtype)
    ref = pool.clone()
    qkv = torch.randn(7, 15 * 64, generator=gen).to(dtype)  # k and v: strided views of one fused output
    k, v = qkv[:, 9 * 64 : 12 * 64].view(7, 3, 64), qkv[:, 12 * 64 :].view(7, 3, 64)
    slots = torch.tensor([5, 17, -1, 100, 319, 0, 33])  # -1: a padding row, not written
    assert cpu.write_kv(pool, 2, k, v, slots)
    write_kv_ref(ref, 2, k, v, slots)
    assert torch.equal(pool, ref)
    assert not cpu.write_kv(pool, 2, k.float() if dtype != torch.float32 else k.bfloat16(), v, slots)


@pytest.mark.skipif(not cpu.linear_usable(), reason="the native linear kernel needs AVX-512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (100, 37), (7, 3)], ids=lambda s: "k{}-n{}".format(*s))
def test_linear_matches_torch(dtype, rows, shape):
    """Every row-count path (1, 2, up to 4, up to 8, more than 8 in passes of 8), widths with a
    tail shorter than a vector and output counts not a multiple of the thread bands' 8."""
    gen = torch.Generator().manual_seed(rows)
    k_in, n_out = shape
    x = torch.randn(rows, k_in, generator=gen).to(dtype)
    w = torch.randn(n_out, k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype)
    for b in (None, bias):
        got = cpu.linear(x, w, b)
        want = F.linear(x.float(), w.float(), None if b is None else b.float())
        assert got is not None and got.dtype == dtype and got.shape == (rows, n_out)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        else:  # summed in float32, rounded once: within one bf16 step of the float32 result
            torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2 ** -7)
    # strided rows (a view of a wider activation) are taken as they are
    wide = torch.randn(rows, k_in + 16, generator=gen).to(dtype)
    got = cpu.linear(wide[:, :k_in], w)
    assert got is not None
    torch.testing.assert_close(got.float(), F.linear(wide[:, :k_in].float(), w.float()), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 40])
@pytest.mark.parametrize("shape", [(576, 960), (1536, 576), (100, 37), (7, 3)], ids=lambda s: "k{}-n{}".format(*s))
def test_linear_panels_match_torch(rows, shape, dtype):
    """Every row count of a 16-row group and past it (groups of 16 over one panel), output
    counts that leave the last panel partly empty, odd widths (bfloat16 takes k in pairs),
    with and without bias, strided rows."""
    if not cpu.panels_usable(dtype):
        pytest.skip(f"no panel kernel for {dtype} on this CPU (AVX-512; AVX512-BF16 for bfloat16)")
    gen = torch.Generator().manual_seed(rows)
    k_in, n_out = shape
    w = torch.randn(n_out, k_in, generator=gen).to(dtype)
    bias = torch.randn(n_out, generator=gen).to(dtype)
    panels = cpu.pack_panels(w)
    width = k_in if dtype == torch.float32 else 2 * -(-k_in // 2)
    assert panels is not None and panels.numel() == -(-n_out // 16) * 16 * width
    wide = torch.randn(rows, k_in + 5, generator=gen).to(dtype)
    for x in (wide[:, :k_in].contiguous(), wide[:, :k_in]):
        for b in (None, bias):
            got = cpu.linear_panels(x, panels, n_out, b)
            assert got is not None and got.shape == (rows, n_out) and got.dtype == dtype
            want = F.linear(x.float(), w.float(), None if b is None else b.float())
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
            else:  # summed in float32, rounded once: within one bf16 step of the float32 result
                torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2 ** -7)


def test_linear_panels_inputs_it_does_not_take_fall_back():
    w = torch.randn(40, 16)
    assert cpu.pack_panels(w.half()) is None  # float32 and bfloat16 only
    assert cpu.pack_panels(w.t().contiguous().t()) is None  # not row-major
    panels = cpu.pack_panels(w)
    if panels is None:
        pytest.skip("the panel linear kernel needs AVX-512")
    assert cpu.linear_panels(torch.randn(2, 16).bfloat16(), panels, 40) is None
    assert cpu.linear_panels(torch.randn(2, 17), panels, 40) is None  # panels of another width
    assert cpu.linear_panels(torch.randn(2, 3, 16), panels, 40) is None  # not 2-D


def test_linear_inputs_it_does_not_take_fall_back():
    w = torch.randn(8, 16)
    assert cpu.linear(torch.randn(2, 16).bfloat16(), w) is None  # dtypes differ
    assert cpu.linear(torch.randn(2, 16), w.t().contiguous().t()) is None  # weight not row-major
    assert cpu.linear(torch.randn(2, 3, 16), w) is None  # not 2-D


def test_no_panels_when_their_copy_would_not_fit_the_memory(monkeypatch, caplog):
    """The panels copy the weights: a model whose weights exceed a quarter of the memory
    available at load gets none (oneDNN and the native kernel serve it)."""
    from libs.engine import cpu_linear

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256, bias=False))

    weights = 2 * 256 * 512 * 4
    monkeypatch.setattr(cpu_linear, "_memory_available", lambda: 4 * weights - 1)
    with caplog.at_level("INFO", logger=cpu_linear.__name__):
        tight = model()
        assert cpu_linear.pack_linears(tight) == 2
    assert all(m.panels is None and m.panel_rows == 0 for m in tight)
    assert "no weight panels" in caplog.text
    monkeypatch.setattr(cpu_linear, "_memory_available", lambda: 4 * weights)
    roomy = model()
    cpu_linear.pack_linears(roomy)
    if cpu.panels_usable(torch.float32):  # packed; kept where they win the timing
        assert all((m.panels is None) == (m.panel_rows == 0) for m in roomy)


def test_packed_linear_gives_the_same_rows_whichever_way_it_takes():
    """PackedLinear's ways (native kernel, panels, MKL on the plain weight, oneDNN's packed one) agree."""
    from libs.engine.cpu_linear import PackedLinear, pack_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40, bias=False))
    want = {rows: model(torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))) for rows in (1, 3, 9)}
    assert pack_linears(model) == 2
    assert all(isinstance(m, PackedLinear) for m in model)
    for m in model:
        if m.panels is None:
            m.panels = cpu.pack_panels(m.weight.detach())
    for native_rows, panel_rows, plain in ((0, 0, False), (0, 0, True), (8, 0, False), (0, 16, False), (1, 64, True)):
        if panel_rows and model[0].panels is None:
            continue  # no AVX-512: no panels
        for m in model:
            m.native_rows, m.panel_rows, m.plain_single_row = native_rows, panel_rows, plain
        if panel_rows:  # the panels really run (a None would fall back to oneDNN unseen)
            assert model[0]._panels(torch.randn(3, 64)) is not None
        for rows, ref in want.items():
            got = model(torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
