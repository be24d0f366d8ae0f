"""Sizing the KV cache on CUDA from --gpu-memory-utilization (vLLM's meaning).

After the weights and the depth pool are on the GPU, one profile step of the largest shape the engine runs
(max_step_tokens tokens as one prompt, the logits of up to max_num_seqs rows and a sort over them, as
top-p sampling does) measures the peak memory a step needs. The KV cache gets what is left of
`utilization * total memory`: the peak counts the weights, the depth pool, activations and what is not
torch's (the CUDA context, library workspaces, other processes on the GPU). CUDA graphs are captured after
the KV cache exists, from the headroom that `1 - utilization` leaves (the start-up log says how much they took).

On the CPU none of this runs: the byte budgets (--kv-cache-memory, --depth-cache-memory) apply.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from engine.model_runner import allocate_kv
from kvcache.depth_cache import DepthCache
from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from models.llama import LlamaForServing

logger = logging.getLogger("depthserve.memory")


@dataclass(frozen=True)
class MemoryProfile:
    total: int  # bytes of GPU memory
    peak: int  # bytes in use at the profile step's peak, all of it (torch's peak + what is not torch's)
    weights_and_pools: int  # bytes torch held before the step (weights, depth pool, persistent buffers)


def kv_blocks_for(profile: MemoryProfile, utilization: float, bytes_per_block: int) -> int:
    """KV blocks (of bytes_per_block) that fit in utilization * total - peak, less the scratch block; may be <= 0."""
    free = utilization * profile.total - profile.peak
    return int(free // bytes_per_block) - 1


def no_room_message(profile: MemoryProfile, utilization: float, bytes_per_block: int, num_tokens: int) -> str:
    gib = 2**30
    return (f"no room for the KV cache: --gpu-memory-utilization {utilization} of {profile.total / gib:.2f} GiB "
            f"allows {utilization * profile.total / gib:.2f} GiB, but a step of {num_tokens} tokens peaks at "
            f"{profile.peak / gib:.2f} GiB (weights and depth pool {profile.weights_and_pools / gib:.2f} GiB), "
            f"leaving no KV block of {bytes_per_block / 2**20:.2f} MiB: increase "
            "--gpu-memory-utilization or reduce --max-num-batched-tokens")


@torch.inference_mode()
def profile_step(model: LlamaForServing, depth: DepthCache | None, num_tokens: int, num_logits: int,
                 block_size: int) -> MemoryProfile:
    """Run the largest step once on the model's CUDA device and measure its peak memory.

    The step writes its K/V into a temporary one-block cache (every token to slot 0), so the KV cache need not
    exist yet; its few bytes are not counted. Tensor-parallel ranks call this together (the forward's
    collectives pair up)."""
    dev = model.embed_tokens.weight.device
    if dev.type != "cuda":
        raise RuntimeError("memory profiling needs a CUDA device")
    gc.collect()  # an engine dropped just before this one may still hold its KV cache in a reference cycle
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    held = torch.cuda.memory_allocated(dev)
    kv = allocate_kv(model, block_size)
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
    t = num_tokens
    s = max(1, min(num_logits, t))
    rope_rows = model.rope.cos.shape[0]
    meta = AttentionMetadata(slot_mapping=torch.zeros(t, dtype=torch.long, device=dev), block_size=block_size,
                             prefills=[PrefillSpan(0, t, t, None, None)])
    batch = ForwardBatch(input_ids=torch.zeros(t, dtype=torch.long, device=dev),
                         positions=torch.arange(t, device=dev) % rope_rows, attn=meta,
                         logits_indices=torch.arange(t - s, t, device=dev), kv_caches=kv,
                         depth=depth.reserve(t) if depth is not None else None)
    try:
        logits = model.compute_logits(model(batch))  # [s, vocab] fp32
        torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)  # what top-p sampling allocates
        torch.cuda.synchronize(dev)
    finally:
        if depth is not None:
            depth.release()
    peak_torch = torch.cuda.max_memory_allocated(dev) - kv_bytes
    free, total = torch.cuda.mem_get_info(dev)
    not_torch = max(0, (total - free) - torch.cuda.memory_reserved(dev))
    del kv, batch, meta
    torch.cuda.empty_cache()
    prof = MemoryProfile(total=total, peak=peak_torch + not_torch, weights_and_pools=held)
    logger.info("memory profile (%d-token step): peak %.2f GiB of %.2f GiB (weights and depth pool %.2f GiB, "
                "not torch's %.2f GiB)", t, prof.peak / 2**30, total / 2**30, held / 2**30, not_torch / 2**30)
    return prof
