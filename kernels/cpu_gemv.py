"""Small-M linear on the plain weight: kernels/csrc/linear.cpp, `depthserve::small_m_linear`.

    y = small_m_linear(x, w)     # x [M, K], w [N, K] row-major, both fp32 or both bf16 -> [M, N] or None

A batch-1..few decode step reads every weight once; this kernel streams a plain row-major weight once
per call for all M rows (fp32 accumulation, the output rounded once to x's dtype) at a large fraction of
memory bandwidth, where torch.mv / F.linear read bf16 weights at well under half of it on CPUs without
AVX-512 (and where oneDNN has no bf16 inner product at all). Numbers: loadtest/bench_gemv.py.

The op exists only once the C++ extension is loaded (the shared loader compiles every kernels/csrc/*.cpp;
tests and the bench build linear.cpp alone). Until then `available()` is False and `small_m_linear`
returns None, so the caller falls back to the reference linear.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "MAX_M", "applies", "available", "small_m_linear"]

# The largest M this kernel takes, measured by loadtest/bench_gemv.py on a 2-core AMD EPYC (AVX2, no
# AVX-512): for bf16 it beats torch.mv / F.linear at every M up to 32, by 1.1-1.7x at M=1 and 2-4x at M>=4,
# but past 16 rows the M-times-repeated FMAs make it compute-bound (< 0.4 of the bandwidth roofline) and a
# GEMM with real blocking should take over; for fp32 it leads F.linear by >= 1.5x up to 8 rows and by
# little at 16 (see DTYPES).
MAX_M = 16

# Weight dtypes the kernel is recommended for, with the largest M for each.
DTYPES = {torch.bfloat16: MAX_M, torch.float32: 8}


def available() -> bool:
    """True once the extension that registers depthserve::small_m_linear is loaded in this process."""
    try:
        return hasattr(torch.ops.depthserve, "small_m_linear")
    except (AttributeError, RuntimeError):
        return False


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the recommended dispatch sends x @ w^T here: CPU, same dtype, M within that dtype's limit."""
    limit = DTYPES.get(w.dtype)
    return (limit is not None and x.dtype == w.dtype and x.dim() == 2 and w.dim() == 2
            and 1 <= x.shape[0] <= limit and x.device.type == "cpu" and w.device.type == "cpu")


def small_m_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ w[N, K]^T via the native kernel ([M, N] in x's dtype), or None when it is not loaded.
    Any x strides; w must be fp32 or bf16 like x (the op raises on anything else)."""
    if not available():
        return None
    return torch.ops.depthserve.small_m_linear(x, w)
