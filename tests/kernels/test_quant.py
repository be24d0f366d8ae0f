"""Weight-only quantized linears (kernels/csrc/quant.cpp: depthserve::quant_linear, depthserve::dequantize, and the
quantized linears of decode_layer / decode_layers) against kernels/quant.py's oracle; and that oracle's quantizer
and dequantizer against gguf-py's. The native tests skip when the library cannot be built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import cpu_ext, ops, quant, reference
from kernels.quant import FORMATS, QuantFormat

F32, BF16 = torch.float32, torch.bfloat16
FMTS = list(FORMATS.values())


@pytest.fixture(scope="module")
def ds():
    if cpu_ext.load() is None or not quant.native_available():
        pytest.skip("the native library (kernels/csrc) cannot be built or loaded here (see its warning)")
    return torch.ops.depthserve


def _case(m: int, n: int, k: int, fmt: QuantFormat, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m * 100003 + n * 101 + k + fmt.ggml_type)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[:, :32] += 0.05  # a block not centred on zero (Q4_1's m, Q4_0's asymmetric scale)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, quant.quantize(w, fmt)


# (m, n, k): every tile path (M 1: 8-row tiles; 2-4: 4 x 4; 5-8: 2 x 8; more: passes of 8, 64 the largest), odd N
# with short last tiles, K of one block, of SmolLM2's d, and past the 2 x 8 tile's K (800)
SHAPES = [(1, 1, 32), (1, 37, 576), (1, 129, 800), (2, 7, 96), (3, 129, 576), (4, 37, 800), (5, 7, 32),
          (8, 129, 96), (8, 37, 800), (17, 37, 576), (17, 1, 96), (64, 129, 800)]


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_linear_matches_reference(ds, fmt, m, n, k) -> None:
    for dtype in (F32, BF16):
        x, q = _case(m, n, k, fmt, dtype)
        got = ds.quant_linear(x, q, fmt.ggml_type)
        assert got.dtype == dtype and got.shape == (m, n) and got.is_contiguous()
        w = quant.dequantize(q, fmt).double()
        exact = x.double() @ w.T  # the oracle's weights and x's values, fp64 sums
        # fp32 accumulation: |err| <= 1e-5 * sum_k |x||w| per output, plus a tiny absolute floor
        bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
        if dtype == F32:
            assert bool(((got.double() - exact).abs() <= bound).all())
        else:  # rounded once to bf16 from the fp32 sum: within one bf16 ulp of the fp32 reference's rounding
            ref = quant.reference_linear(x, q, fmt).double()
            ulp = ref.abs().clamp_min(1e-30).log2().floor().exp2() * 2.0 ** -7
            assert bool(((got.double() - ref).abs() <= ulp + bound).all())
            # and exactly the fp32 kernel's sums rounded once (bf16 x times few-bit weights make exact ties common,
            # so no comparison with the fp64 sum's rounding)
            assert torch.equal(got, ds.quant_linear(x.float(), q, fmt.ggml_type).to(BF16))


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("k", [192, 800])
@pytest.mark.parametrize("m", [20, 80])
def test_fp32_is_small_m_linear_on_the_dequantized_weight(ds, fmt, k, m) -> None:
    """The kernel expands each block exactly as dequantize does and sums as small_m_linear's fp32 tiles do; a row's
    result is independent of M (the register paths of M <= 64 and the scratch path above agree)."""
    x, q = _case(m, 75, k, fmt, F32)
    got = ds.quant_linear(x, q, fmt.ggml_type)
    torch.testing.assert_close(got, ds.small_m_linear(x, quant.dequantize(q, fmt)), rtol=0, atol=0)
    for i in (0, 3, 19):
        torch.testing.assert_close(ds.quant_linear(x[i:i + 1], q, fmt.ggml_type), got[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(ds.quant_linear(x[:3], q, fmt.ggml_type), got[:3], rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strided_inputs(ds, fmt, dtype) -> None:
    x, q = _case(6, 37, 96, fmt, dtype)
    want = ds.quant_linear(x, q, fmt.ggml_type)
    xt = x.t().contiguous().t()  # column-major x
    xs = torch.stack([x, -x], 2).reshape(6, 192)[:, ::2]  # column stride 2
    xr = torch.cat([x, x], 1)[:, :96]  # row stride 192
    for xv in (xt, xs, xr, x[:, :].clone()):
        torch.testing.assert_close(ds.quant_linear(xv, q, fmt.ggml_type), want, rtol=0, atol=0)
    padded = torch.cat([q, torch.full((37, 13), 255, dtype=torch.uint8)], 1)[:, :q.shape[1]]  # row stride > bytes
    assert padded.stride(0) > padded.shape[1]
    torch.testing.assert_close(ds.quant_linear(x, padded, fmt.ggml_type), want, rtol=0, atol=0)
    torch.testing.assert_close(ds.quant_linear(x, q[5:20], fmt.ggml_type), want[:, 5:20], rtol=0, atol=0)
    torch.testing.assert_close(ds.dequantize(padded, fmt.ggml_type, dtype), quant.dequantize(q, fmt, dtype),
                               rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (129, 576), (300, 1536)])
def test_dequantize_is_exact(ds, fmt, shape) -> None:
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * 3
    w[0, :32] = 0  # an all-zero block: d = 0
    q = quant.quantize(w, fmt)
    want = quant.dequantize(q, fmt)
    got = ds.dequantize(q, fmt.ggml_type, F32)
    assert got.dtype == F32 and got.shape == shape
    assert torch.equal(got, want)
    got16 = ds.dequantize(q, fmt.ggml_type, BF16)
    assert got16.dtype == BF16 and torch.equal(got16, want.to(BF16))
    assert torch.equal(ops.dequantize(q, fmt, BF16), want.to(BF16))


def test_ops_linear_on_quantized_weights(ds, monkeypatch) -> None:
    """kernels.ops.linear: up to small_m_rows rows the native kernel; more rows the weight dequantized (in pieces
    when large) into a GEMM. Both compute reference_linear's values (fp32 x)."""
    for m in (3, 70):
        x, q = _case(m, 37, 64, quant.Q4_1, F32)
        pw = ops.PackedLinear(q, None, ops.QUANT_MAX_M, quant=quant.Q4_1)
        want = quant.reference_linear(x, q, quant.Q4_1)
        torch.testing.assert_close(ops.linear(x, pw), want, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(ops, "QUANT_PIECE_BYTES", 64 * 4 * 5)  # 5 rows a piece: 8 pieces, the last short
        torch.testing.assert_close(ops.linear(x, pw), want, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()


def test_bad_inputs_raise(ds) -> None:
    x, q = _case(2, 5, 64, quant.Q8_0, F32)
    ql = ds.quant_linear
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ql(torch.randn(2, 40), torch.zeros(5, 34, dtype=torch.uint8), 8)
    with pytest.raises(RuntimeError, match="each weight row must be 68 bytes"):
        ql(x, q[:, :34], 8)
    with pytest.raises(RuntimeError, match="whole number of 18-byte blocks"):
        ql(x, q, 2)  # 68 bytes are no Q4_0 row
    with pytest.raises(RuntimeError, match="must be uint8"):
        ql(x, q.to(torch.int16), 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ql(x.double(), q, 8)
    with pytest.raises(RuntimeError, match="ggml_type must be"):
        ql(x, q, 1)
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16"):
        ds.dequantize(q, 8, torch.float16)
    assert ql(x[:0], q, 8).shape == (0, 5)
    assert ql(x, q[:0], 8).shape == (2, 0)


# ---- the fused decode layer with quantized linears: bit for bit the per-op composition ----------------------

def _per_op(monkeypatch) -> None:
    """Make reference.decode_layer(s) the per-op path on the native ops: each op of the native kernel set, the
    plain linears by small_m_linear and the quantized ones by quant_linear (the format from the row bytes)."""
    ks = ops._native_ops()
    assert ks is not None
    for name in ("rms_norm", "add_rms_norm", "attnres_site", "attnres_phase1", "rotary", "silu_mul", "store_kv",
                 "decode_attention"):
        monkeypatch.setattr(reference, name, getattr(ks, name))

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if w.dtype != torch.uint8:
            return torch.ops.depthserve.small_m_linear(x, w)
        bb = w.shape[1] // (x.shape[1] // 32)
        return torch.ops.depthserve.quant_linear(x, w, {34: 8, 18: 2, 20: 3}[bb])

    monkeypatch.setattr(reference, "linear", linear)


MIXES = [("q8_0", "q4_0", "q4_1", None), ("q4_1", None, "q8_0", "q4_0", "q4_0"), ("q4_0",)]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(f or "plain" for f in m))
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("block", [False, True], ids=["standard", "block"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_layers_equal_per_op(ds, monkeypatch, dtype, block, rows, mix) -> None:
    _per_op(monkeypatch)
    got_args, got_kw = ops.decode_layers_case(dtype, block, rows, quant=mix)
    want_args, want_kw = ops.decode_layers_case(dtype, block, rows, quant=mix)
    assert any(w.dtype == torch.uint8 for w in got_args[1])
    got = ops._native_ops().decode_layers(*got_args, **got_kw)
    want = reference.decode_layers(*want_args, **want_kw)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip([got_args[0], *got_args[3], *got_args[4]], [want_args[0], *want_args[3], *want_args[4]],
                    strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # h, the caches
    if block:
        for key in ("states", "keys", "lse", "xo"):
            torch.testing.assert_close(got_kw[key], want_kw[key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decode_layer_equals_per_op(ds, monkeypatch, dtype) -> None:
    _per_op(monkeypatch)
    outs = []
    for fn in (ds.decode_layer.default, reference.decode_layer):
        args, _ = ops.decode_layers_case(dtype, False, 3, quant=("q4_1", "q8_0", None, "q4_0"))
        x, weights, norms, k_caches, v_caches, cos, sin, slots, table, lens, bs, scale, eps = args
        residual = torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
        out = fn(x, weights[:4], cos, sin, k_caches[0], v_caches[0], slots, table, lens, bs, scale, norms[1], eps,
                 residual, None, None, None, None, True)
        outs.append([out, k_caches[0], v_caches[0], residual])
    for g, w in zip(*outs, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_decode_layer_refuses_bad_quantized_weights(ds) -> None:
    args, _ = ops.decode_layers_case(F32, False, 1, quant=("q8_0",))
    x, weights, norms, k_caches, v_caches, cos, sin, slots, table, lens, bs, scale, eps = args
    residual = torch.zeros_like(x)

    def call(ws: list[torch.Tensor]) -> torch.Tensor:
        return ds.decode_layer(x, ws, cos, sin, k_caches[0], v_caches[0], slots, table, lens, bs, scale, norms[1], eps,
                               residual, None, None, None, None, True)

    with pytest.raises(RuntimeError, match=r"w_o is quantized \(uint8\) with rows of 66 bytes; for 3 blocks"):
        call([weights[0], weights[1][:, :66], weights[2], weights[3]])
    with pytest.raises(RuntimeError, match="w_gate_up must have 4 rows"):
        call([weights[0], weights[1], weights[2][:5], weights[3]])
    with pytest.raises(RuntimeError, match="w_down must be of x's dtype"):
        call([weights[0], weights[1], weights[2], torch.zeros(96, 64, dtype=torch.float64)])
    call(weights[:4])  # and the good ones run


# ---- the reference quantizer / dequantizer against gguf-py's --------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_quantize_matches_gguf(fmt) -> None:
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    qtype = GGMLQuantizationType(fmt.ggml_type)
    g = torch.Generator().manual_seed(fmt.ggml_type)
    w = torch.randn(33, 256, generator=g) * torch.rand(33, 1, generator=g) * 4
    w[1, :32] = 0
    w[2, 32:64] = 1.5  # a constant block
    w[3, 64:96] = -torch.arange(32.0)
    q = quant.quantize(w, fmt)
    want = gq.quantize(w.numpy(), qtype)
    assert q.shape == tuple(want.shape) and np.array_equal(q.numpy(), want)
    np.testing.assert_array_equal(quant.dequantize(q, fmt).numpy(), gq.dequantize(want, qtype))
