"""Depth mixing for AttnRes: the two-phase Block schedule, Full AttnRes, and the depth-pool layout.

The math, and how these functions map onto it: docs/attnres.md (§5 two-phase schedule, §6 depth pool).

Keys: w · (g ⊙ v̂) = (w ⊙ g) · v̂, so with the gain g folded into the query at load a source's key
is its plain RMS-normalised value v̂ = v / rms(v). The depth pool keeps each completed source and its
key, computed once (one fused rms_norm) when the source is completed.

The plain reference `naive_mix` lives in models.reference; tests hold these functions to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.context import DepthBuffers


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
        q, f32 = self.num_phase1_queries, torch.float32
        return DepthBuffers(
            states=torch.zeros(rows, self.num_sources, self.hidden, dtype=self.state_dtype, device=device),
            keys=torch.zeros(rows, self.num_sources, self.hidden, dtype=f32, device=device),
            lse=torch.zeros(rows, q, dtype=f32, device=device) if q else None,
            xo=torch.zeros(rows, q, self.hidden, dtype=f32, device=device) if q else None,
        )


def depth_pool_spec(cfg: ModelConfig, dtype: torch.dtype) -> DepthPoolSpec | None:
    """Depth states are kept in fp32 whatever the serving dtype: the partial sums accumulate without
    bf16 rounding, and the scores need no per-sublayer casts (which cost more than the bytes saved)."""
    del dtype
    if cfg.attn_res_mode == "none":
        return None
    q = 2 * cfg.attn_res_block_size if cfg.attn_res_mode == "block" else 0
    return DepthPoolSpec(cfg.num_depth_sources, cfg.hidden_size, q, torch.float32)


def key_of(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A source's key: RMS-normalised without gain (folded into the queries), fp32: [..., d] -> [..., d]."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


def phase1(states: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every query of a block against all completed blocks in one batched matmul.

    states: [T, n, d] completed blocks; keys: [T, n, d] their keys; queries: [Q, d] fp32 (gains folded).
    Returns per query the log-sum-exp of its scores lse [T, Q] and its normalised mix of the blocks
    xo [T, Q, d] (fp32), written into `out` (depth-pool views) when given. These are the paper's
    (m, l, o) statistics in normalised form: lse = m + log l, xo = o / l.
    """
    s = states.float()
    scores = torch.matmul(keys, queries.t()).transpose(1, 2)  # [T, Q, n]
    lse, xo = out if out is not None else (None, None)
    lse = torch.logsumexp(scores, -1, out=lse)  # [T, Q]
    p = torch.exp(scores - lse.unsqueeze(-1))  # softmax over the blocks, [T, Q, n]
    xo = torch.bmm(p, s, out=xo)  # [T, Q, d]
    return lse, xo


def phase2_fused(lse1: torch.Tensor, xo1: torch.Tensor, partial: torch.Tensor, query: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """Merge Phase-1 statistics with the current partial sum (online softmax over two groups).

    lse1: [T]; xo1: [T, d]; partial: [T, d] fp32; query: [d] fp32 (gain folded). With s2 the partial's
    score, softmax over {blocks, partial} gives the partial the weight e^s2 / (e^lse1 + e^s2) =
    sigmoid(s2 - lse1), and the blocks keep their Phase-1 proportions, so x = lerp(xo1, partial, w): the
    same result as M = max(m1, m2) rescaling, in the fewest kernels. Returns x [T, d] fp32.
    """
    w = torch.sigmoid_((key_of(partial, eps) @ query).sub_(lse1))  # [T]
    return torch.lerp(xo1, partial, w.unsqueeze(-1))  # [T, d]


def mix_sources(states: torch.Tensor, keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot mix over n sources with precomputed keys: states, keys [T, n, d] -> (x [T, d] fp32, alpha [T, n])."""
    s = states.float()
    scores = torch.matmul(keys, query)  # [T, n]
    alpha = torch.softmax(scores, dim=-1)
    return torch.bmm(alpha.unsqueeze(1), s).squeeze(1), alpha


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
