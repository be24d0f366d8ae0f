"""Fixed-size KV blocks with reference counts, an LRU free list and a hash -> block map.

A block with ref_count 0 sits in the free list but keeps its hash, so a later request with the same
prefix can revive it; it is evicted (hash dropped) only when the pool hands it out again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvcache.prefix import BlockHash


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks from the LRU end of the free list, evicting their cached hashes."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, blk = self._free.popitem(last=False)
            if blk.block_hash is not None:
                if self._cached.get(blk.block_hash) is blk:
                    del self._cached[blk.block_hash]
                blk.block_hash = None
            blk.ref_count = 1
            out.append(blk)
        return out

    def lookup(self, h: BlockHash) -> KVBlock | None:
        return self._cached.get(h) if self.enable_caching else None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks, reviving them from the free list if needed."""
        for blk in blocks:
            if blk.ref_count == 0:
                del self._free[blk.block_id]
            blk.ref_count += 1

    def cache(self, blk: KVBlock, h: BlockHash) -> None:
        """Publish a full, computed block under its prefix hash (first writer wins)."""
        if not self.enable_caching or blk.block_hash is not None:
            return
        if h not in self._cached:
            self._cached[h] = blk
            blk.block_hash = h

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero go to the MRU end of the free list.

        Callers pass a request's blocks in reverse order so its tail blocks are evicted first.
        """
        for blk in blocks:
            if blk.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {blk.block_id}")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self._free[blk.block_id] = blk
