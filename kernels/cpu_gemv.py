"""Small-M linear on the plain weight: kernels/csrc/linear.cpp, `depthserve::small_m_linear`.

    y = small_m_linear(x, w)     # x [M, K], w [N, K] row-major, both fp32 or both bf16 -> [M, N] or None

A decode step at small M reads every weight once; this kernel streams a plain row-major weight once per
call for all M rows (fp32 accumulation, the output rounded once to x's dtype) close to memory bandwidth.
On CPUs without AVX-512 oneDNN has no bf16 inner product, and torch.mv / F.linear read bf16 weights at
~0.6 of the read bandwidth (M=1) or far below it (F.linear bf16 at M >= 4 is 4-7x slower than this kernel).
Numbers and method: loadtest/bench_gemv.py.

The op exists once the native library is loaded (kernels/cpu_ext.py compiles every kernels/csrc/*.cpp);
`available()` says whether it is; `small_m_linear` returns None until then. kernels.ops.pack_linear records
per weight how many rows go to it (PackedLinear.small_m_rows, from MAX_M; 0 when the op is absent or fails
its probe), so the hot path pays one integer comparison.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_M", "applies", "available", "small_m_linear"]

# The largest M per weight dtype for which the kernel is the recommended linear, measured by
# loadtest/bench_gemv.py and a larger-M sweep on a 2-core AMD EPYC (Zen 3: AVX2+FMA, no AVX-512):
# - bfloat16: ahead of torch.mv by 1.3-1.5x at M=1 (2 threads) and of F.linear by 4-7x at every M measured
#   from 4 to 256; a weight upcast + fp32 F.linear catches up at M ~ 64-128, so past 64 rows that (or this
#   kernel) is the choice, never F.linear in bf16 on such a CPU.
# - float32: ahead of torch.mv (1.4-2.4x at 2 threads, 1.05-1.4x at 1), of F.linear (1.6-5x) up to M=16, and
#   of oneDNN packed by 1.1-1.7x at M=1-4, level to 1.2x at M=8-16 and level at M=32, where a blocked
#   GEMM's efficiency starts to count.
MAX_M = {torch.bfloat16: 64, torch.float32: 16}

def available() -> bool:
    """True once the extension that registers depthserve::small_m_linear is loaded in this process."""
    try:
        return hasattr(torch.ops.depthserve, "small_m_linear")
    except (AttributeError, RuntimeError):
        return False


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The recommended dispatch: CPU tensors of one dtype, 1 <= M <= MAX_M[dtype], a 2-D x and weight."""
    limit = MAX_M.get(w.dtype, 0)
    return (x.dtype == w.dtype and x.dim() == 2 and w.dim() == 2 and 1 <= x.shape[0] <= limit
            and x.device.type == "cpu" and w.device.type == "cpu")


def small_m_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] @ w[N, K]^T via the native kernel ([M, N] in x's dtype), or None when it is not loaded.
    Any x strides; w must be fp32 or bf16 like x (the op raises on anything else)."""
    if not available():
        return None
    return torch.ops.depthserve.small_m_linear(x, w)
