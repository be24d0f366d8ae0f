"""RMSNorm and the standard residual's add + RMSNorm: each program normalises a tile of whole rows.

Rounding follows kernels/reference.py: normalise in fp32, round to the weight's dtype, multiply by the
weight (the product rounded once more to that dtype); add_rms_norm rounds the sum to the residual's dtype,
stores it, and normalises the stored value. Every load is widened to fp32 before any arithmetic (the
interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton.language as tl

from kernels import reference
from kernels.triton.jit import interpreting, kernel, next_pow2, runs_here


@kernel
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, t_rows, d, stride_xt, stride_xd, stride_w, stride_ot, eps,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < t_rows)[:, None] & (cols < d)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
    y = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = y * tl.load(w_ptr + cols * stride_w, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, t_rows, d, stride_xt, stride_xd, stride_rt, stride_rd,
                         stride_w, stride_ot, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < t_rows)[:, None] & (cols < d)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    r_ptrs = r_ptr + rows[:, None] * stride_rt + cols[None, :] * stride_rd
    r = (tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + x).to(r_ptr.dtype.element_ty)
    tl.store(r_ptrs, r, mask=mask)
    h = r.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / d + eps)
    y = (h * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = y * tl.load(w_ptr + cols * stride_w, mask=cols < d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


ROW_TILE = 4096  # elements of the [rows, d] tile one program holds (compiled)
INTERPRETED_ROW_TILE = 1 << 16  # the interpreter's cost is per program: take many rows at once


def row_tiling(t: int, d: int) -> tuple[int, int, int, int]:
    """(grid, BLOCK_T, BLOCK_D, num_warps) for a row-wise kernel over [t, d]. Compiled, BLOCK_T depends on d
    only (one compilation per model width, whatever the batch)."""
    block_d = next_pow2(d)
    if interpreting():
        block_t = max(1, min(INTERPRETED_ROW_TILE // block_d, next_pow2(t)))
    else:
        block_t = max(1, ROW_TILE // block_d)
    return -(-t // block_t), block_t, block_d, row_warps(block_t * block_d)


def row_warps(tile: int) -> int:
    """Warps for a tile of `tile` fp32 values: about 8-16 per thread."""
    return 1 if tile <= 256 else 2 if tile <= 1024 else 4 if tile <= 2048 else 8 if tile <= 8192 else 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels.reference.rms_norm: x [T, d] (any strides) -> [T, d] in weight.dtype."""
    if not runs_here(x):
        return reference.rms_norm(x, weight, eps)
    t, d = x.shape
    out = torch.empty((t, d), dtype=weight.dtype, device=x.device)
    if t == 0:
        return out
    grid, block_t, block_d, warps = row_tiling(t, d)
    _rms_norm_kernel[(grid,)](x, weight, out, t, d, x.stride(0), x.stride(1), weight.stride(0), out.stride(0), eps,
                              BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels.reference.add_rms_norm: residual += x in place, returns rms_norm(residual, weight, eps)."""
    if not runs_here(residual):
        return reference.add_rms_norm(x, residual, weight, eps)
    t, d = residual.shape
    out = torch.empty((t, d), dtype=weight.dtype, device=residual.device)
    if t == 0:
        return out
    grid, block_t, block_d, warps = row_tiling(t, d)
    _add_rms_norm_kernel[(grid,)](x, residual, weight, out, t, d, x.stride(0), x.stride(1), residual.stride(0),
                                  residual.stride(1), weight.stride(0), out.stride(0), eps,
                                  BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out
