"""Decode attention on CPU that reads K/V blocks in place: depthserve::decode_attention (kernels/csrc/
decode_attention.cpp) behind the reference's signature.

`native_decode_attention(q, k_cache, v_cache, meta, scale)` runs the compiled op when it is registered in
torch.ops.depthserve and can read the tensors as given (CPU, fp32 or bf16 q and caches of one dtype, head
dim contiguous, the block-table view in `meta`); anything else runs kernels.reference.decode_attention. The
op walks each row's context through meta.decode_block_table and meta.decode_context_lens, so the
reference's gather view (decode_gather, decode_mask) is not read on this path.

This module loads nothing by itself: whoever builds the extension registers the op. Until the shared
extension loader exists, `build_standalone` compiles this one source (tests and loadtest/bench_decode_attention.py
use it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kernels import reference
from models.context import AttentionMetadata

__all__ = ["SOURCE", "available", "build_standalone", "native_decode_attention", "op"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"
# -fopenmp in both: at::parallel_for's OpenMP region is compiled into the extension (see the source's header)
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_DTYPES = (torch.float32, torch.bfloat16)
_op: Callable[..., torch.Tensor] | None = None


def op() -> Callable[..., torch.Tensor] | None:
    """torch.ops.depthserve.decode_attention, or None while no loaded library registered it."""
    global _op
    if _op is None:
        try:
            _op = torch.ops.depthserve.decode_attention
        except (AttributeError, RuntimeError):
            return None
    return _op


def available() -> bool:
    return op() is not None


def native_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """kernels.reference.decode_attention's contract: q [B, H, hd], caches [num_slots, KV, hd] -> [B, H, hd]."""
    f = op()
    if (f is None or meta.decode_block_table is None or meta.decode_context_lens is None
            or q.device.type != "cpu" or k_cache.device.type != "cpu" or v_cache.device.type != "cpu"
            or q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        return reference.decode_attention(q, k_cache, v_cache, meta, scale)
    return f(q, k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens, meta.block_size, scale)


def build_standalone(build_directory: str | Path, name: str = "depthserve_decode_attention") -> Callable[..., torch.Tensor]:
    """Compile kernels/csrc/decode_attention.cpp alone and register its op (a stopgap until the shared loader
    builds every kernels/csrc source). Raises whatever the build raises (no compiler, no headers, ...)."""
    if op() is None:
        from torch.utils.cpp_extension import load

        Path(build_directory).mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(SOURCE)], is_python_module=False, extra_cflags=CFLAGS,
             extra_ldflags=LDFLAGS, build_directory=str(build_directory))
    f = op()
    if f is None:
        raise RuntimeError(f"{SOURCE.name} built but registered no depthserve::decode_attention")
    return f
