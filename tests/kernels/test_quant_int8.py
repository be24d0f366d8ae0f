"""Quantized linears with int8 activations (kernels/csrc/quant_int8.cpp: depthserve::int8_linear) against
kernels/quant.py's contract (quantize_activations, int8_reference_linear, pack_int8), and their dispatch in
kernels.ops. The native tests skip where the library has no int8_linear (a CPU without AVX-512 VNNI)."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext, ops, quant
from kernels.quant import FORMATS, QuantFormat

F32, BF16 = torch.float32, torch.bfloat16
FMTS = list(FORMATS.values())


@pytest.fixture(scope="module")
def ds():
    if cpu_ext.load() is None or not hasattr(torch.ops.depthserve, "int8_linear"):
        pytest.skip("no native int8_linear here (needs the native library built for AVX-512 VNNI)")
    return torch.ops.depthserve


def _case(m: int, n: int, k: int, fmt: QuantFormat, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m * 100003 + n * 101 + k + fmt.ggml_type)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w[:, :32] += 0.05  # a block not centred on zero (Q4_1's m)
    x = torch.randn(m, k, generator=g) * 3
    x[:, k - 32:] = 0  # an all-zero block of x (scale 0)
    x[0, k // 2] = 40.0  # an outlier: its block's scale
    return x.to(dtype), quant.quantize(w, fmt)


def _run(ds, x: torch.Tensor, q: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    iw = quant.pack_int8(q, fmt)
    return ds.int8_linear(x, iw.w8, iw.d, iw.m, iw.n, iw.offset)


def _bound(x: torch.Tensor, q: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The kernel's fp32 rounding: each block term d_w d_x isum is rounded (scale product, fma) and summed in fp32,
    so |err| <= 1e-6 (about 8 eps32) * the sum of |terms| (the block count is small)."""
    qx, dx = quant.quantize_activations(x)
    wq = quant.dequantize(q, fmt).double()
    xq = (qx.double() * dx.double()).reshape(x.shape)
    return 1e-6 * (xq.abs() @ wq.abs().T) + 1e-30


# (m, n, k): tiles of 4 rows x 3 groups of 16 outputs, with every row remainder (1-3) and group remainder (1, 2),
# N not a multiple of 16, one block of K, SmolLM2's d and intermediate, and more rows than a chunk (128)
SHAPES = [(1, 1, 32), (2, 17, 64), (3, 33, 96), (4, 48, 576), (5, 100, 576), (9, 37, 1536), (32, 64, 800),
          (130, 50, 64)]


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_int8_linear_matches_reference(ds, fmt, m, n, k) -> None:
    for dtype in (F32, BF16):
        x, q = _case(m, n, k, fmt, dtype)
        got = _run(ds, x, q, fmt)
        assert got.dtype == dtype and got.shape == (m, n) and got.is_contiguous()
        ref = quant.int8_reference_linear(x.float(), q, fmt).double()  # fp64 sums of the same int8 terms
        bound = _bound(x, q, fmt)
        if dtype == F32:
            assert bool(((got.double() - ref).abs() <= bound).all())
        else:  # the fp32 kernel's sums rounded once
            assert torch.equal(got, _run(ds, x.float(), q, fmt).to(BF16))


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_int8_error_against_the_weight_only_linear_is_the_activation_rounding(ds, fmt) -> None:
    """Against x @ dequantize(W)^T the only difference is x's rounding to int8 blocks: within half a step of each
    block's scale times sum |w|."""
    x, q = _case(9, 37, 576, fmt, F32)
    got = _run(ds, x, q, fmt).double()
    w = quant.dequantize(q, fmt).double()
    exact = x.double() @ w.T
    _, dx = quant.quantize_activations(x)  # [M, nb, 1]
    half_step = (dx.double() / 2).expand(-1, -1, quant.BLOCK).reshape(x.shape)  # [M, K]
    assert bool(((got - exact).abs() <= half_step @ w.abs().T + _bound(x, q, fmt)).all())


def test_strided_input(ds) -> None:
    fmt = quant.Q8_0
    x, q = _case(6, 40, 96, fmt, F32)
    wide = torch.zeros(6, 2 * 96)
    wide[:, ::2] = x  # a column stride of 2
    assert torch.equal(_run(ds, wide[:, ::2], q, fmt), _run(ds, x, q, fmt))
    assert torch.equal(_run(ds, x.T.contiguous().T, q, fmt), _run(ds, x, q, fmt))  # a row stride of 1


def test_quantize_activations() -> None:
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29])  # a zero block, then amax 2
    qx, dx = quant.quantize_activations(x)
    assert torch.equal(dx.flatten(), torch.tensor([0.0, 2.0]) / 127)
    assert qx[0, 0].abs().sum() == 0
    assert qx[0, 1, :3].tolist() == [64, -127, 32]  # 63.5 and 31.75 rounded half to even / nearest


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_pack_int8_layout(fmt) -> None:
    """w8[g, b, kg, r, j] holds row 16 g + r's quant 32 b + 4 kg + j, plus the offset; padding rows are zero."""
    _, q = _case(1, 21, 96, fmt, F32)
    iw = quant.pack_int8(q, fmt)
    vals, d, m = quant._unpack(q, fmt)  # [N, nb, 32]
    assert iw.w8.shape == (2, 3, 8, 16, 4) and iw.w8.data_ptr() % 64 == 0
    back = iw.w8.permute(0, 3, 1, 2, 4).reshape(32, 3, 32).to(torch.int16) - iw.offset  # [G*16, nb, 32]
    assert torch.equal(back[:21], vals)
    assert bool((iw.w8.permute(0, 3, 1, 2, 4).reshape(32, -1)[21:] == 0).all())
    assert torch.equal(iw.d.permute(0, 2, 1).reshape(32, 3)[:21], d.squeeze(-1))
    assert (m is None) == (iw.m.numel() == 0)
    assert iw.offset == (0 if fmt is quant.Q4_1 else 128)


def test_bad_inputs_raise(ds) -> None:
    x, q = _case(2, 16, 64, quant.Q8_0, F32)
    iw = quant.pack_int8(q, quant.Q8_0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ds.int8_linear(torch.zeros(2, 40), iw.w8, iw.d, iw.m, 16, 128)
    with pytest.raises(RuntimeError, match="w8 must be"):
        ds.int8_linear(x, iw.w8, iw.d, iw.m, 17 + 16, 128)  # one group more than packed
    with pytest.raises(RuntimeError, match="offset"):
        ds.int8_linear(x, iw.w8, iw.d, iw.m, 16, 1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ds.int8_linear(x.double(), iw.w8, iw.d, iw.m, 16, 128)


def test_ops_dispatch(ds, monkeypatch) -> None:
    """A quantized PackedLinear with int8 activations: up to INT8_MIN_M rows the weight-only kernel (x never
    rounded), more rows the int8 kernel; without, the weight-only path throughout."""
    assert ops._int8_native_ok()
    backend = ops.select_backend("native", (F32,))
    x, q = _case(ops.INT8_MIN_M + 1, 40, 96, quant.Q4_1, F32)
    pw = ops.pack_linear(q, backend, quant.Q4_1, int8_activations=True)
    assert pw.int8 is not None and pw.small_m_rows == ops.INT8_MIN_M
    assert torch.equal(ops.linear(x, pw), _run(ds, x, q, quant.Q4_1))
    few = x[: ops.INT8_MIN_M]
    assert torch.equal(ops.linear(few, pw), ds.quant_linear(few, q, quant.Q4_1.ggml_type))
    plain = ops.pack_linear(q, backend, quant.Q4_1)
    assert plain.int8 is None
    assert torch.allclose(ops.linear(x, plain), quant.reference_linear(x, q, quant.Q4_1), rtol=1e-5, atol=1e-5)
