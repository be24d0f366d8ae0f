"""The depth cache: a per-step pool of AttnRes block states, keys and Phase-1 statistics.

Depth attention never mixes tokens, so nothing in it outlives a step: the pool is allocated once
for the most tokens one step may carry and its first T rows are lent to each step. Its byte budget
therefore bounds the step's token budget (chunked prefill keeps long prompts inside it).
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.context import DepthBuffers


class PoolSpec(Protocol):
    @property
    def bytes_per_token(self) -> int: ...

    def allocate(self, rows: int, device: torch.device | str = "cpu") -> DepthBuffers: ...


def max_tokens_for_budget(spec: PoolSpec, budget_bytes: int) -> int:
    return budget_bytes // spec.bytes_per_token


class DepthCache:
    def __init__(self, spec: PoolSpec, max_tokens: int, device: torch.device | str = "cpu") -> None:
        if max_tokens < 1:
            raise ValueError("the depth cache must hold at least one token")
        self.spec = spec
        self.capacity = max_tokens
        self._pool = spec.allocate(max_tokens, device)  # on the model's device
        self.rows_in_use = 0

    @property
    def bytes(self) -> int:
        return self.capacity * self.spec.bytes_per_token

    def tensors(self) -> list[torch.Tensor]:
        """The pool's buffers (for memory advice: kernels/hugepages.py)."""
        return [t for t in vars(self._pool).values() if isinstance(t, torch.Tensor)]

    def reserve(self, num_tokens: int) -> DepthBuffers:
        """Lend rows [0, num_tokens) for one step; release() must follow."""
        if self.rows_in_use:
            raise RuntimeError("depth cache reserved twice in one step")
        if num_tokens > self.capacity:
            raise RuntimeError(f"step of {num_tokens} tokens exceeds the depth cache ({self.capacity} rows)")
        self.rows_in_use = num_tokens
        p = self._pool
        return DepthBuffers(
            states=p.states[:num_tokens], keys=p.keys[:num_tokens],
            lse=None if p.lse is None else p.lse[:num_tokens],
            xo=None if p.xo is None else p.xo[:num_tokens])

    def release(self) -> None:
        self.rows_in_use = 0
