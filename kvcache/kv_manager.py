"""The scheduler's only KV-cache API: match a prefix, allocate slots for new tokens, free.

Requests are identified by id; the manager owns their block lists and prefix hashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvcache.block_pool import BlockPool, KVBlock
from kvcache.prefix import ROOT_HASH, BlockHash, hash_full_blocks


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (counted by the scheduler on admission)
    hits: int = 0  # of which found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_published: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def num_request_blocks(self) -> int:
        """Blocks referenced by live requests (0 when idle): every block with no reference is in the free list."""
        return self.pool.num_blocks - self.pool.num_free

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(req_id, [])]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching ------------------------------------------------------------------------
    def _extend_hashes(self, req_id: str, token_ids: Sequence[int], upto_tokens: int) -> list[BlockHash]:
        hashes = self._hashes.setdefault(req_id, [])
        hashes += hash_full_blocks(token_ids, self.block_size, start_block=len(hashes),
                                   parent=hashes[-1] if hashes else ROOT_HASH, num_tokens=upto_tokens)
        return hashes

    def get_computed_blocks(self, req_id: str, token_ids: Sequence[int]) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._extend_hashes(req_id, token_ids, max_blocks * self.block_size)
        hit: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            blk = self.pool.lookup(h)
            if blk is None:
                break
            hit.append(blk)
        return hit, len(hit) * self.block_size

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for tokens [num_computed, num_computed + num_new); False (and no change) if full.

        `computed_blocks` are prefix hits from get_computed_blocks for a request not yet holding blocks.
        """
        computed_blocks = computed_blocks or []
        held = self._blocks.get(req_id, [])
        total = num_computed_tokens + num_new_tokens
        need_new = self.blocks_needed(total) - len(held) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if b.ref_count == 0)  # they leave the free list
        if need_new + revived > self.pool.num_free:
            return False
        self.pool.touch(computed_blocks)
        held = held + computed_blocks + (self.pool.allocate(need_new) if need_new > 0 else [])
        self._blocks[req_id] = held
        return True

    def cache_computed(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publish the request's blocks that are full of computed KV under their prefix hashes.

        Called only after the step that wrote them succeeded: a block published before its KV exists
        would hand a later request with the same prefix garbage (a failed step never publishes).
        """
        if not self.enable_prefix_caching:
            return
        held = self._blocks[req_id]
        full = num_computed_tokens // self.block_size
        start = self._num_published.get(req_id, 0)
        if full <= start:
            return
        hashes = self._extend_hashes(req_id, token_ids, full * self.block_size)
        for b in range(start, full):
            self.pool.cache(held[b], hashes[b])
        self._num_published[req_id] = full

    def trim(self, req_id: str, num_tokens: int) -> int | None:
        """Give back the request's tail blocks that hold none of its first `num_tokens` tokens (slots of rejected
        drafts). They were never published: publishing stops at the computed tokens. Returns the blocks kept,
        or None when nothing was given back."""
        held = self._blocks.get(req_id)
        keep = self.blocks_needed(num_tokens)
        if held is None or len(held) <= keep:
            return None
        self.pool.free(list(reversed(held[keep:])))
        del held[keep:]
        return keep

    def free(self, req_id: str) -> None:
        """Release a finished, aborted or preempted request's blocks (tail first, so it is evicted first)."""
        blocks = self._blocks.pop(req_id, [])
        self.pool.free(list(reversed(blocks)))
        self._hashes.pop(req_id, None)
        self._num_published.pop(req_id, None)

    def slot_mapping(self, req_id: str, start: int, end: int) -> list[int]:
        """Flat KV slots of token positions [start, end) of a request."""
        bs = self.block_size
        blocks = self._blocks[req_id]
        return [blocks[p // bs].block_id * bs + p % bs for p in range(start, end)]
