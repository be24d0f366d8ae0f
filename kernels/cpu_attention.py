"""Decode attention on CPU that reads K/V blocks in place: depthserve::decode_attention (kernels/csrc/
decode_attention.cpp) behind the reference's signature.

`native_decode_attention(q, k_cache, v_cache, meta, scale)` runs the compiled op when it is registered in
torch.ops.depthserve and can read the tensors as given (CPU, fp32 or bf16 q and caches of one dtype, any
strides, the block-table view in `meta`); anything else runs kernels.reference.decode_attention. The op walks
each row's context through meta.decode_block_table and meta.decode_context_lens, so the reference's gather
view (decode_gather, decode_mask) is not read on this path.

This module loads nothing by itself: kernels/cpu_ext.py builds every kernels/csrc source into one library
and registers the op (`ensure_loaded` asks it to).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import reference
from models.context import AttentionMetadata

__all__ = ["available", "ensure_loaded", "native_decode_attention", "op"]

_DTYPES = (torch.float32, torch.bfloat16)
_op: Callable[..., torch.Tensor] | None = None


def op() -> Callable[..., torch.Tensor] | None:
    """torch.ops.depthserve.decode_attention, or None while no loaded library registered it."""
    global _op
    if _op is None:
        try:
            _op = torch.ops.depthserve.decode_attention.default  # the overload: one Python call less per use
        except (AttributeError, RuntimeError):
            return None
    return _op


def available() -> bool:
    return op() is not None


def native_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """kernels.reference.decode_attention's contract: q [B, H, hd], caches [num_slots, KV, hd] -> [B, H, hd]."""
    # Runs 30x per decode step: only the checks that choose the path, the cheap way (`is_cpu` ~0.1 µs where
    # `device.type` costs ~1 µs; the op reads any strides, so no `stride()` at ~0.4 µs each); the op checks the
    # rest.
    f = _op if _op is not None else op()
    table, lens = meta.decode_block_table, meta.decode_context_lens
    dtype = q.dtype
    if (f is None or table is None or lens is None or not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu)
            or dtype not in _DTYPES or k_cache.dtype is not dtype or v_cache.dtype is not dtype):
        return reference.decode_attention(q, k_cache, v_cache, meta, scale)
    return f(q, k_cache, v_cache, table, lens, meta.block_size, scale)


def ensure_loaded() -> Callable[..., torch.Tensor]:
    """The op, building and loading the native library (kernels/cpu_ext.py, every kernels/csrc source) if this
    process has not yet. Raises RuntimeError when the library or the op is unavailable (see its warning)."""
    if op() is None:
        from kernels import cpu_ext

        cpu_ext.load()
    f = op()
    if f is None:
        raise RuntimeError("the native library did not register depthserve::decode_attention (see its warning)")
    return f
