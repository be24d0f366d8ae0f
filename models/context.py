"""Per-step inputs of the serving model: one flat packed batch and its attention metadata.

The engine's model runner builds a ForwardBatch once per step; every layer reads it. Nothing
here is global: the batch is passed down the call chain explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class PrefillSpan:
    """One sequence with more than one new token this step (a prompt chunk)."""

    start: int  # first row of this sequence in the packed batch
    end: int  # one past its last row
    context_len: int  # tokens in its KV cache after this step (prefix + earlier chunks + this chunk)
    gather_slots: torch.Tensor | None  # [context_len] KV slots; None when the whole context is this chunk
    mask: torch.Tensor | None  # [1, 1, q_len, context_len] bool (True = attend); None when causal from 0


@dataclass
class AttentionMetadata:
    """How the packed rows map onto the paged KV cache. Decode rows come first: rows [0, num_decode)."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0
    # Decode rows' context, two views: block table + lengths (kernels that read K/V blocks in place) and
    # the per-position slots + mask (the reference's gather and SDPA; None until needed: decode_gather_view).
    block_size: int = 0  # tokens per KV block
    decode_block_table: torch.Tensor | None = None  # [B_d, nb] KV block ids of each decode sequence
    decode_context_lens: torch.Tensor | None = None  # [B_d] int32 context length (this step's token included)
    decode_gather: torch.Tensor | None = None  # [B_d, C] KV slots of each decode sequence, padded
    decode_mask: torch.Tensor | None = None  # [B_d, 1, 1, C] bool, True for real context positions
    prefills: list[PrefillSpan] = field(default_factory=list)

    def decode_gather_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """decode_gather and decode_mask, built from the block table and lengths the first time they are asked
        for, then kept (every layer shares this metadata: at most one build per step).

        The runner builds them up front only for the reference decode attention (KernelSet.needs_decode_gather);
        a native or Triton decode attention that falls back to the reference for one call (tensors it does not
        take, e.g. fp16 on the CPU) gets them here. On the host the width is trimmed to the longest context;
        on a device it stays the block table's (no host sync), the mask hides the rest."""
        if self.decode_gather is None or self.decode_mask is None:
            table, lens, bs = self.decode_block_table, self.decode_context_lens, self.block_size
            if table is None or lens is None:
                raise ValueError("decode rows need decode_gather or the block table and context lengths")
            width = int(lens.max()) if lens.device.type == "cpu" and len(lens) else table.shape[1] * bs
            table = table[:, :-(-width // bs)]
            slots = table.unsqueeze(-1) * bs + torch.arange(bs, dtype=table.dtype, device=table.device)
            self.decode_gather = slots.reshape(len(table), -1)[:, :width]  # [B_d, C]
            self.decode_mask = (torch.arange(width, device=lens.device).unsqueeze(0)
                                < lens.unsqueeze(1))[:, None, None, :]
        return self.decode_gather, self.decode_mask


class Communicator(Protocol):
    """Collective ops a tensor-parallel model needs (implemented over torch.distributed in engine/)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DepthBuffers:
    """Views of the depth pool for the T rows of this step (shapes from models.attn_res.depth_pool_spec)."""

    states: torch.Tensor  # [T, n_src, d] completed blocks (embedding first) and the current partial
    keys: torch.Tensor  # [T, n_src, d] fp32: each completed source RMS-normalised (its key, gain folded away)
    lse: torch.Tensor | None = None  # [T, Q] fp32 Phase-1 log-sum-exp per query of the open block
    xo: torch.Tensor | None = None  # [T, Q, d] fp32 Phase-1 softmax-weighted mix of the completed blocks


@dataclass
class ForwardBatch:
    """Everything one forward step needs."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows whose next-token logits are wanted
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V each [num_slots, n_kv, hd]
    depth: DepthBuffers | None = None  # AttnRes models only
    # Depth-attention introspection, off unless a request asks: the rows whose weights are recorded
    # (into the list the caller passes to the model's forward).
    depth_rows: torch.Tensor | None = None  # [R]
    # Early exit (depth drafts): run only the first `num_layers` decoder layers, then the output head over the
    # states that exist then. None: every layer.
    num_layers: int | None = None
