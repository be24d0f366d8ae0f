"""Transparent huge pages for the long-lived CPU buffers a decode step streams (weights, depth pool, KV cache).

A batch-1 decode step reads every weight once; with 4 KiB pages that is a TLB miss every 4 KiB of the stream.
Backed by 2 MiB pages the small-M kernel streams the 57 MB LM head ~5-7% faster (48.3-48.8 -> 51.0-51.6 GB/s,
interleaved, 2-core AMD EPYC, `madvise` THP mode). Many kernels (this one included: `enabled` = madvise) give
huge pages only where asked, so this asks:

- MADV_HUGEPAGE marks a range: later page faults in it take huge pages, and khugepaged may merge the pages
  already there, eventually;
- MADV_COLLAPSE (Linux 6.1+) merges the resident pages now, synchronously (~1.2 s per GB here): used for the
  weights, which are resident and read from the first step on.

Best effort: anything the kernel refuses (older kernel, THP `never`, not Linux, a file-backed mapping) is
skipped silently and changes nothing but speed. Only the 2 MiB-aligned interior of each tensor's storage is
advised, so no neighbouring allocation is touched. DEPTHSERVE_NO_HUGEPAGES=1 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import time
from collections.abc import Iterable

import torch

__all__ = ["advise", "back_model", "model_tensors", "move_to_arena"]

logger = logging.getLogger("depthserve.kernels")

HUGE = 2 << 20  # the x86-64 / arm64 (4 KiB base page) huge-page size
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
ENV_OFF = "DEPTHSERVE_NO_HUGEPAGES"


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _interior(t: torch.Tensor) -> tuple[int, int] | None:
    """The 2 MiB-aligned [start, end) inside t's storage, or None when there is no whole huge page in it."""
    storage = t.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    a, b = (start + HUGE - 1) // HUGE * HUGE, end // HUGE * HUGE
    return (a, b) if b > a else None


def advise(tensors: Iterable[torch.Tensor], collapse: bool) -> int:
    """Mark each CPU tensor's storage for huge pages (and merge its resident pages now when `collapse`);
    returns the bytes advised. Each storage is advised once, however many tensors view it."""
    fn = _madvise()
    if fn is None:
        return 0
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or t.is_mkldnn or t.untyped_storage().nbytes() < HUGE:
            continue  # opaque (oneDNN-packed) tensors have no storage to advise
        span = _interior(t)
        if span is None or span[0] in seen:
            continue
        seen.add(span[0])
        a, b = span
        if fn(a, b - a, MADV_HUGEPAGE) != 0:
            continue  # THP off, or not an anonymous mapping: nothing more to ask
        if collapse:
            fn(a, b - a, MADV_COLLAPSE)  # may fail (no memory to spare for the copy, old kernel): still marked
        total += b - a
    return total


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of `model`, and the packed copies of its linears (kernels.ops.PackedLinear)."""
    out = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is not None and getattr(packed, "packed", None) is not None:
            out.append(packed.packed)
    return out


def _own_storage(t: torch.Tensor) -> bool:
    """t is the whole of its storage (not a view sharing it with another tensor, whose aliasing a move would
    break)."""
    return (t.layout == torch.strided and not t.is_mkldnn and t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.nbytes)


def move_to_arena(params: Iterable[torch.Tensor]) -> tuple[object, int]:
    """Copy the CPU parameters into one anonymous mapping marked for huge pages before it is touched, and point
    each at its copy (`p.data = ...`: the same Parameter objects, so every holder sees the move).

    Most of a small model's weights are under 2 MiB each (SmolLM2-135M: o_proj 0.66 MB, qkv 1.1 MB), too small
    for a huge page of their own; packed end to end they all get one. Returns (the mapping, to be kept alive
    with the model, or None; bytes moved)."""
    fn = _madvise()
    if fn is None:
        return None, 0
    items: dict[int, list[torch.Tensor]] = {}  # storage -> the parameters on it (tied weights: several)
    for p in params:
        if p.device.type == "cpu" and _own_storage(p) and p.nbytes >= 4096:
            group = items.setdefault(p.untyped_storage().data_ptr(), [])
            if all(q is not p for q in group):
                group.append(p)
    total = sum(-(-g[0].nbytes // 64) * 64 for g in items.values())
    if total < HUGE:
        return None, 0
    size = -(-total // HUGE) * HUGE + HUGE  # + one huge page of slack to align the start
    arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(arena, dtype=torch.uint8)  # holds a reference to the mapping
    off = (-base.data_ptr()) % HUGE
    if fn(base.data_ptr() + off, size - off - (size - off) % HUGE, MADV_HUGEPAGE) != 0:
        return None, 0  # THP off: the copy would gain nothing
    for group in items.values():
        n = group[0].nbytes
        view = base[off:off + n].view(group[0].dtype).view(group[0].shape)
        view.copy_(group[0].detach())
        for p in group:  # tensors that shared a storage share its copy
            p.data = view
        off += -(-n // 64) * 64
    return arena, total


def back_model(model: torch.nn.Module, extra: Iterable[torch.Tensor] = ()) -> None:
    """The model's weights moved into huge pages (kept by the model), the other big tensors it holds (packed
    linears) merged in place, and `extra` (KV cache, depth pool: allocated once) marked. Logs what it did."""
    t0 = time.perf_counter()
    arena, moved = move_to_arena(list(model.parameters()))
    if arena is not None:
        model._hugepage_arena = arena  # type: ignore[attr-defined]  # the weights' memory: lives with the model
    params = {id(p) for p in model.parameters()} if arena is not None else set()
    merged = advise([t for t in model_tensors(model) if id(t) not in params], collapse=True)
    marked = advise(extra, collapse=False)
    if moved or merged or marked:
        logger.info("huge pages: %.0f MiB of weights moved into them, %.0f MiB merged in place, %.0f MiB of "
                    "caches marked (%.2f s)", moved / 2**20, merged / 2**20, marked / 2**20, time.perf_counter() - t0)
