"""kernels/csrc/linear.cpp (depthserve::small_m_linear): equals F.linear in fp32 and fp32 math on the bf16
values in bf16, for odd K (a vector tail) and odd N (a partial row tile), M across the register tiles, and
any x strides. Through the native library (kernels/cpu_ext.py); skips when it cannot be built here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_gemv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def op():
    from kernels import cpu_ext

    if cpu_ext.load() is None or not cpu_gemv.available():
        pytest.skip("the native library (kernels/csrc) cannot be built or loaded here (see its warning)")
    return cpu_gemv.small_m_linear


def _case(m: int, n: int, k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(m * 100003 + n * 101 + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, w


SHAPES = [(1537, 577), (5, 67), (96, 64), (1, 7), (3, 3), (11, 33), (10, 130), (9, 1024), (7, 3001)]  # (N, K)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp32_matches_f_linear(op, shape, m) -> None:
    x, w = _case(m, *shape, torch.float32)
    got = op(x, w)
    want = F.linear(x.double(), w.double()).float()
    assert got.dtype == torch.float32 and got.shape == (m, shape[0]) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_is_fp32_math_rounded_once(op, shape, m) -> None:
    x, w = _case(m, *shape, torch.bfloat16)
    got = op(x, w)
    exact = F.linear(x.double(), w.double())  # the bf16 values, exact products, fp64 sums
    assert got.dtype == torch.bfloat16 and got.shape == (m, shape[0])
    # one rounding to bf16 (half an ulp: 2^-9 relative) plus fp32 summation error
    err = (got.double() - exact).abs()
    bound = exact.abs() * 2.0 ** -8 + 1e-5 * exact.abs().max()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    # and it is the fp32 result rounded: equal to it in all but the rare rounding-boundary ties
    assert (got == exact.float().to(torch.bfloat16)).float().mean().item() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(op, dtype) -> None:
    x, w = _case(4, 37, 61, dtype)
    want = op(x, w)
    xt = x.t().contiguous().t()  # column-major x
    xs = torch.stack([x, -x], 2).reshape(4, 122)[:, ::2]  # column stride 2
    xr = torch.cat([x, x], 1)[:, :61]  # row stride 122
    for xv in (xt, xs, xr):
        torch.testing.assert_close(op(xv, w), want, rtol=0, atol=0)
    torch.testing.assert_close(op(x[1:3], w), want[1:3], rtol=0, atol=0)
    torch.testing.assert_close(op(x[2:3], w), want[2:3], rtol=0, atol=0)
    wb = torch.cat([w, w], 1)
    torch.testing.assert_close(op(x, wb[:, :61]), want, rtol=0, atol=0)  # weight rows with a gap
    torch.testing.assert_close(op(x, w.t().contiguous().t()), want, rtol=0, atol=0)  # column-major weight
    torch.testing.assert_close(op(x, w[10:20]), want[:, 10:20], rtol=0, atol=0)


def test_edges_and_errors(op) -> None:
    assert op(torch.zeros(0, 8), torch.ones(5, 8)).shape == (0, 5)
    assert op(torch.ones(2, 0), torch.ones(5, 0)).eq(0).all()
    with pytest.raises(RuntimeError):
        op(torch.ones(2, 8), torch.ones(5, 9))  # K differs
    with pytest.raises(RuntimeError):
        op(torch.ones(2, 8), torch.ones(5, 8, dtype=torch.bfloat16))  # dtypes differ
    with pytest.raises(RuntimeError):
        op(torch.ones(2, 8, dtype=torch.float16), torch.ones(5, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError):
        op(torch.ones(8), torch.ones(5, 8))


def test_threads_give_the_same_result(op) -> None:
    """A shape large enough to split across threads equals the same call on one thread (bit for bit)."""
    x, w = _case(3, 4099, 515, torch.bfloat16)
    got = op(x, w)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = op(x, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, one, rtol=0, atol=0)


def test_applies_rule() -> None:
    x = torch.ones(1, 8, dtype=torch.bfloat16)
    w = torch.ones(4, 8, dtype=torch.bfloat16)
    assert cpu_gemv.applies(x, w)
    assert cpu_gemv.applies(torch.ones(cpu_gemv.MAX_M[torch.bfloat16], 8, dtype=torch.bfloat16), w)
    assert not cpu_gemv.applies(torch.ones(cpu_gemv.MAX_M[torch.bfloat16] + 1, 8, dtype=torch.bfloat16), w)
    assert not cpu_gemv.applies(torch.ones(cpu_gemv.MAX_M[torch.float32] + 1, 8), w.float())
    assert not cpu_gemv.applies(torch.ones(0, 8), w.float())
    assert not cpu_gemv.applies(x.half(), w.half())
    assert not cpu_gemv.applies(x.float(), w)


def test_ops_linear_routes_small_m_to_the_kernel(op) -> None:
    """kernels.ops.pack_linear gives a weight small_m_rows = MAX_M where the native ops run (0 on the reference
    backend), and kernels.ops.linear sends up to that many rows to the kernel, more to the other linears."""
    from kernels import ops

    x, w = _case(3, 37, 61, torch.bfloat16)
    b = torch.randn(37).to(torch.bfloat16)
    assert ops.pack_linear(w, ops.select_backend("reference")).small_m_rows == 0
    torch.testing.assert_close(ops.linear(x, ops.PackedLinear(w), b), F.linear(x, w, b))
    pw = ops.pack_linear(w, ops.Backend("reference", "auto", "no bf16 linears"))  # native ops, reference linears
    assert pw.small_m_rows == cpu_gemv.MAX_M[torch.bfloat16] and pw.packed is None
    torch.testing.assert_close(ops.linear(x, pw, b), op(x, w) + b, rtol=0, atol=0)
    big = torch.randn(cpu_gemv.MAX_M[torch.bfloat16] + 1, 61).to(torch.bfloat16)
    torch.testing.assert_close(ops.linear(big, pw), F.linear(big, w))  # past MAX_M: the reference
    assert ops.linear(x[:0], pw).shape == (0, 37)  # no rows (a step that samples nothing): not the kernel


def test_bf16_prompt_rows_compute_in_fp32_without_cpu_bf16(op, monkeypatch) -> None:
    """Past small_m_rows a bf16 weight on a CPU without bf16 GEMM computes in fp32 (rounded once), where bf16
    F.linear measured 4-7x slower; with bf16 GEMM (or on the reference backend) it stays bf16."""
    from kernels import ops

    x, w = _case(70, 37, 61, torch.bfloat16)
    monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: False)
    pw = ops.pack_linear(w, ops.Backend("reference", "auto", "no bf16 linears"))
    assert pw.upcast
    torch.testing.assert_close(ops.linear(x, pw), F.linear(x.float(), w.float()).to(torch.bfloat16), rtol=0, atol=0)
    assert not ops.pack_linear(w, ops.select_backend("reference")).upcast
    monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: True)
    assert not ops.pack_linear(w, ops.Backend("reference", "auto", "no bf16 linears")).upcast
