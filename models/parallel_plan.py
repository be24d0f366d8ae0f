"""How a model splits over tensor-parallel ranks: the one place that does the shard arithmetic.

`shard_sizes(cfg, tp)` checks that the model divides evenly over `tp` ranks and returns each rank's
local sizes. The engine calls it before sizing anything (the divisibility check), the layers size
their parameters from it, the KV cache sizes its blocks from it, and the layers' weight loaders
use its row ranges to pick a rank's slice out of a checkpoint tensor.

Split rules (Megatron style):
- query heads, and the MLP's intermediate size, split evenly (column-parallel in, row-parallel out);
- KV heads split evenly when there are at least as many as ranks; with fewer, each head is
  replicated on tp / kv_heads consecutive ranks, so every rank holds exactly one;
- the vocabulary is padded up to a multiple of tp and split in row ranges; padding rows are zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from models.config import ModelConfig


@dataclass(frozen=True)
class ShardSizes:
    """One rank's share of a model split over `tp` ranks (every rank gets the same sizes)."""

    tp: int
    head_dim: int
    heads: int  # local query heads
    kv_heads: int  # local KV heads (1 when the model's KV heads are fewer than ranks: replicated)
    intermediate: int  # local MLP intermediate size
    vocab: int  # local rows of the padded vocabulary
    full_vocab: int  # the model's vocab_size (rows at and past it are padding)
    kv_replicas: int  # ranks holding the same KV head (1 when KV heads are sharded)

    @property
    def padded_vocab(self) -> int:
        return self.vocab * self.tp

    def q_rows(self, rank: int) -> slice:
        """Rows of q_proj (columns of o_proj) that `rank` owns."""
        n = self.heads * self.head_dim
        return slice(rank * n, (rank + 1) * n)

    def kv_rows(self, rank: int) -> slice:
        """Rows of k_proj / v_proj that `rank` owns: its own heads, or the head it shares."""
        first = (rank // self.kv_replicas) * self.kv_heads
        return slice(first * self.head_dim, (first + self.kv_heads) * self.head_dim)

    def intermediate_rows(self, rank: int) -> slice:
        """Rows of gate_proj / up_proj (columns of down_proj) that `rank` owns."""
        return slice(rank * self.intermediate, (rank + 1) * self.intermediate)

    def vocab_rows(self, rank: int) -> slice:
        """Rows [lo, hi) of the padded vocabulary that `rank` owns (hi may pass full_vocab)."""
        return slice(rank * self.vocab, (rank + 1) * self.vocab)


def shard_sizes(cfg: ModelConfig, tp: int) -> ShardSizes:
    """Each rank's sizes for `cfg` over `tp` ranks; ValueError naming the field that does not split."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    for name in ("num_attention_heads", "intermediate_size"):
        size = getattr(cfg, name)
        if size % tp:
            raise ValueError(f"{name}={size} is not divisible by tensor_parallel_size={tp}")
    kv = cfg.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"num_key_value_heads={kv} must divide, or be a multiple of, tensor_parallel_size={tp}")
    return ShardSizes(
        tp=tp, head_dim=cfg.head_dim, heads=cfg.num_attention_heads // tp, kv_heads=max(1, kv // tp),
        intermediate=cfg.intermediate_size // tp, vocab=-(-cfg.vocab_size // tp), full_vocab=cfg.vocab_size,
        kv_replicas=max(1, tp // kv))


# ---- checkpoint tensors as weight loaders see them ---------------------------------------------------
class TensorSource(Protocol):
    """A checkpoint tensor that can be read in part (safetensors slices, GGUF tensors, in-memory tensors),
    so that a rank reads (and dequantizes) only its slice."""

    shape: tuple[int, ...]

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor: ...


class InMemoryTensor:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.shape = tuple(t.shape)

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        t = self.t if rows is None else self.t[rows]
        return t if cols is None else t[:, cols]


def as_source(loaded: TensorSource | torch.Tensor) -> TensorSource:
    return InMemoryTensor(loaded) if isinstance(loaded, torch.Tensor) else loaded


# weight_loader(param, checkpoint tensor or reader, shard_id): copies this rank's slice into param.
WeightLoader = Callable[..., None]


@torch.no_grad()
def default_weight_loader(param: torch.Tensor, loaded: TensorSource | torch.Tensor,
                          shard_id: object = None) -> None:
    """A replicated parameter: every rank copies the whole tensor (a [1, d] vector into a [d] one)."""
    param.copy_(as_source(loaded).read().reshape(param.shape))
