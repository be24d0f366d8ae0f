"""Native CPU ops: oneDNN (mkldnn) inner products on weights reordered once into oneDNN's blocked layout.

`F.linear` re-reads the plain [out, in] weight through a GEMM that is tuned for large batches; for the
small M of decode it streams the weight well below memory bandwidth. `torch.ops.mkldnn._reorder_linear_weight`
packs the weight once (an opaque mkldnn tensor, a copy) and `torch.ops.mkldnn._linear_pointwise` applies
it: the ops torch.compile's CPU backend (torch/_inductor/fx_passes/mkldnn_fusion.py) emits for frozen
linears. fp32 and bf16 (bf16 needs avx512bw/vl/dq or avx_ne_convert; oneDNN raises otherwise).
"""

from __future__ import annotations

import torch


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] plain weight -> a packed copy for `linear` (no batch-size hint: decode and prefill share it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) with W packed by `pack_linear`; same dtype in and out."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
