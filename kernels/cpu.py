"""Native CPU ops.

Linears: oneDNN (mkldnn) inner products on weights reordered once into oneDNN's blocked layout.
`F.linear` re-reads the plain [out, in] weight through a GEMM that is tuned for large batches; for the
small M of decode it streams the weight well below memory bandwidth. `torch.ops.mkldnn._reorder_linear_weight`
packs the weight once (an opaque mkldnn tensor, a copy) and `torch.ops.mkldnn._linear_pointwise` applies
it: the ops torch.compile's CPU backend (torch/_inductor/fx_passes/mkldnn_fusion.py) emits for frozen
linears. fp32 and bf16 (bf16 needs avx512bw/vl/dq or avx_ne_convert; oneDNN raises otherwise).

The other ops (rms_norm, add_rms_norm, attnres_site, attnres_phase1, attnres_mix, rotary, silu_mul,
store_kv, and decode_layer / decode_layers: a whole decoder layer, or every layer, of a pure-decode step in one call,
kernels/csrc/decode_layer.cpp):
kernels/csrc/*.cpp, built and loaded by kernels/cpu_ext.py as torch.ops.depthserve.*; `extension_ops` wraps
them with kernels/reference.py's signatures. Each wrapper is one torch.ops call; the C++ op checks its tensors
before it writes anything and raises for those it does not handle (not on the CPU, an inner dim that is not
contiguous, a dtype other than float32 / bfloat16 where it computes, a slot out of range), and the wrapper then
runs the reference op instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import reference


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] plain weight -> a packed copy for `linear` (no batch-size hint: decode and prefill share it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) with W packed by `pack_linear`; same dtype in and out."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _rms_norm(op) -> Callable[..., torch.Tensor]:
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        try:
            return op(x, weight, eps)
        except RuntimeError:  # tensors the kernel does not take (NotImplementedError too: off the CPU)
            return reference.rms_norm(x, weight, eps)
    return rms_norm


def _add_rms_norm(op) -> Callable[..., torch.Tensor]:
    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        try:
            return op(x, residual, weight, eps)
        except RuntimeError:
            return reference.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm


def _attnres_site(op) -> Callable[..., torch.Tensor]:
    def attnres_site(partial: torch.Tensor, delta: torch.Tensor | None, lse1: torch.Tensor, xo1: torch.Tensor,
                     query: torch.Tensor, weight: torch.Tensor, eps: float, accumulate: bool = True) -> torch.Tensor:
        try:
            return op(partial, delta, lse1, xo1, query, weight, eps, accumulate)
        except RuntimeError:
            return reference.attnres_site(partial, delta, lse1, xo1, query, weight, eps, accumulate)
    return attnres_site


def _attnres_phase1(op) -> Callable[..., None]:
    def attnres_phase1(states: torch.Tensor, keys: torch.Tensor, n: int, queries: torch.Tensor, lse: torch.Tensor,
                       xo: torch.Tensor, eps: float) -> None:
        try:
            op(states, keys, n, queries, lse, xo, eps)
        except RuntimeError:
            reference.attnres_phase1(states, keys, n, queries, lse, xo, eps)
    return attnres_phase1


def _attnres_mix(op) -> Callable[..., torch.Tensor]:
    def attnres_mix(states: torch.Tensor, keys: torch.Tensor, n: int, delta: torch.Tensor | None, query: torch.Tensor,
                    weight: torch.Tensor, eps: float, accumulate: bool = False,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return op(states, keys, n, delta, query, weight, eps, accumulate, rows)
        except RuntimeError:
            return reference.attnres_mix(states, keys, n, delta, query, weight, eps, accumulate, rows)
    return attnres_mix


def _rotary(op) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            op(q, k, cos, sin)  # in place (the C++ checks everything before it writes)
            return q, k
        except RuntimeError:
            return reference.rotary(q, k, cos, sin)
    return rotary


def _silu_mul(op) -> Callable[..., torch.Tensor]:
    def silu_mul(gu: torch.Tensor) -> torch.Tensor:
        try:
            return op(gu)
        except RuntimeError:
            return reference.silu_mul(gu)
    return silu_mul


def _store_kv(op) -> Callable[..., None]:
    def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        try:
            op(k, v, k_cache, v_cache, slot_mapping)  # checks every slot before it writes
        except RuntimeError:  # index_copy_ then raises its own error for a slot out of range
            reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return store_kv


def _decode_layer(op) -> Callable[..., torch.Tensor | None]:
    def decode_layer(x: torch.Tensor, weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                     norm_weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                     partial: torch.Tensor | None = None, lse1: torch.Tensor | None = None,
                     xo1: torch.Tensor | None = None, query: torch.Tensor | None = None,
                     accumulate: bool = True) -> torch.Tensor | None:
        """None (nothing written) when the op does not take these tensors: the caller runs the per-op path."""
        try:
            return op(x, weights, cos, sin, k_cache, v_cache, slot_mapping, block_table, context_lens, block_size,
                      scale, norm_weight, eps, residual, partial, lse1, xo1, query, accumulate)
        except RuntimeError:
            return None
    return decode_layer


def _decode_layers(op) -> Callable[..., torch.Tensor | None]:
    def decode_layers(h: torch.Tensor, weights: list[torch.Tensor], norms: list[torch.Tensor],
                      k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                      slot_mapping: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                      block_size: int, scale: float, eps: float, states: torch.Tensor | None = None,
                      keys: torch.Tensor | None = None, lse: torch.Tensor | None = None, xo: torch.Tensor | None = None,
                      block_queries: list[torch.Tensor] | None = None, site_queries: torch.Tensor | None = None,
                      attn_res_block_size: int = 0) -> torch.Tensor | None:
        """None (nothing written) when the op does not take these tensors: the caller runs layer by layer."""
        try:
            return op(h, weights, norms, k_caches, v_caches, cos, sin, slot_mapping, block_table, context_lens,
                      block_size, scale, eps, states, keys, lse, xo, block_queries or [], site_queries,
                      attn_res_block_size)
        except RuntimeError:
            return None
    return decode_layers


_WRAPPERS = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "attnres_site": _attnres_site,
             "attnres_phase1": _attnres_phase1, "attnres_mix": _attnres_mix, "rotary": _rotary, "silu_mul": _silu_mul,
             "store_kv": _store_kv, "decode_layer": _decode_layer,
             "decode_layers": _decode_layers}


def extension_ops() -> dict[str, Callable]:
    """The kernels/csrc ops that torch.ops.depthserve has (the library loaded: kernels.cpu_ext.load()), by name,
    each with its reference's signature and the reference as its fallback."""
    ns = torch.ops.depthserve
    return {name: wrap(getattr(ns, name).default) for name, wrap in _WRAPPERS.items() if hasattr(ns, name)}
