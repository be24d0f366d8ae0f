"""Depth mixing for AttnRes: the two-phase Block schedule, Full AttnRes, and the depth-pool layout.

The math, and how these functions map onto it: docs/attnres.md (§5 two-phase schedule, §6 depth pool).

Keys: w · (g ⊙ v̂) = (w ⊙ g) · v̂, so with the gain g folded into the query at load a source's key
is its plain RMS-normalised value v̂ = v / rms(v). The depth pool keeps each completed source and its
key, computed once (one fused rms_norm) when the source is completed.

The mixing math itself (key_of, phase1, phase2_fused, mix_sources) is kernels/reference.py's, re-exported
here; the plain reference `naive_mix` lives in models.reference, and tests hold the two to each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.reference import key_of, mix_sources, phase1, phase2_fused
from models.config import ModelConfig
from models.context import DepthBuffers

__all__ = ["BlockSchedule", "DepthPoolSpec", "depth_pool_spec", "key_of", "mix_sources", "phase1", "phase2_fused"]


@dataclass(frozen=True)
class DepthPoolSpec:
    """Per-token shapes of the depth pool; the cache manager multiplies them by its row count."""

    num_sources: int  # N completed blocks + 1 partial (block), or 2L + 1 (full)
    hidden: int
    num_phase1_queries: int  # 2 * block_size for block mode, 0 for full
    state_dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        state = self.num_sources * self.hidden * torch.empty((), dtype=self.state_dtype).element_size()
        keys = self.num_sources * self.hidden * 4
        phase1 = self.num_phase1_queries * (1 + self.hidden) * 4
        return state + keys + phase1

    def allocate(self, rows: int, device: torch.device | str = "cpu") -> DepthBuffers:
        """[rows, S, d] views of source-major storage ([S, rows, d]): every op reads one source (or one
        Phase-1 query's xo) of all rows, and source-major makes that a contiguous [T, d] block instead of T
        pieces a pool row apart, which the CPU's prefetcher loses at every jump (a prefill-sized attnres_site
        ran ~2x slower on the row-major pool). A row's n sources are n sequential streams either way."""
        q, f32 = self.num_phase1_queries, torch.float32

        def pool(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, rows, self.hidden, dtype=dtype, device=device).transpose(0, 1)

        return DepthBuffers(
            states=pool(self.num_sources, self.state_dtype),
            keys=pool(self.num_sources, f32),
            lse=torch.zeros(rows, q, dtype=f32, device=device) if q else None,
            xo=pool(q, f32) if q else None,
        )


def depth_pool_spec(cfg: ModelConfig, dtype: torch.dtype) -> DepthPoolSpec | None:
    """Depth states are kept in fp32 whatever the serving dtype: the partial sums accumulate without
    bf16 rounding, and the scores need no per-sublayer casts (which cost more than the bytes saved)."""
    del dtype
    if cfg.attn_res_mode == "none":
        return None
    q = 2 * cfg.attn_res_block_size if cfg.attn_res_mode == "block" else 0
    return DepthPoolSpec(cfg.num_depth_sources, cfg.hidden_size, q, torch.float32)


class BlockSchedule:
    """Which layers open a block, and which Phase-1 query row each sublayer of a layer uses."""

    def __init__(self, num_layers: int, block_size: int) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_blocks = math.ceil(num_layers / block_size)

    def opens_block(self, layer: int) -> bool:
        return layer % self.block_size == 0

    def block_of(self, layer: int) -> int:
        return layer // self.block_size

    def block_layers(self, block: int) -> range:
        return range(block * self.block_size, min((block + 1) * self.block_size, self.num_layers))

    def query_rows(self, layer: int) -> tuple[int, int]:
        """Rows of this layer's attention and MLP queries within its block's stacked query matrix."""
        j = layer % self.block_size
        return 2 * j, 2 * j + 1
