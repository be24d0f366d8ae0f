"""CPU unit tests of the KV block pool, prefix hashing and the cache manager (no model)."""

from __future__ import annotations

import pytest

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from kvcache.prefix import hash_full_blocks


def test_pool_lru_eviction_and_revival() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"h-a")
    pool.free([a])
    pool.free([b])
    assert pool.lookup(b"h-a") is a  # freed but still cached
    pool.touch([a])  # a prefix hit revives it
    assert a.ref_count == 1 and pool.num_free == 1
    pool.free([a])
    (x,) = pool.allocate(1)  # LRU: b was freed before a was freed again
    assert x is b and pool.lookup(b"h-a") is a
    pool.allocate(1)  # now a is handed out and its hash evicted
    assert pool.lookup(b"h-a") is None
    with pytest.raises(RuntimeError, match="asked for 1"):
        pool.allocate(1)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([c, c])


def test_prefix_hash_chains_whole_prefix() -> None:
    h1 = hash_full_blocks([1, 2, 3, 4, 5, 6], 2)
    h2 = hash_full_blocks([9, 2, 3, 4, 5, 6], 2)
    assert len(h1) == 3 and all(a != b for a, b in zip(h1, h2, strict=True))
    assert hash_full_blocks([1, 2, 3, 4, 5], 2) == h1[:2]


def test_manager_allocates_shares_and_frees() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    hit, n = kv.get_computed_blocks("a", prompt)
    assert (hit, n) == ([], 0)
    assert kv.allocate_slots("a", prompt, 0, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.slot_mapping("a", 3, 6) == [3, 4, 5]
    kv.cache_computed("a", prompt, 10)  # the step that wrote them succeeded
    # Another request with the same first 8 tokens hits two full blocks and shares them.
    other = prompt[:8] + [77, 78, 79]
    hit, n = kv.get_computed_blocks("b", other)
    assert n == 8 and [b.block_id for b in hit] == [0, 1]
    assert kv.allocate_slots("b", other, n, len(other) - n, hit)
    assert kv.block_ids("b")[:2] == [0, 1] and kv.num_request_blocks() == 4
    assert kv.num_request_blocks() == sum(b.ref_count > 0 for b in kv.pool.blocks)
    kv.free("a")
    kv.free("b")
    assert kv.num_request_blocks() == 0 and kv.usage() == 0.0


def test_whole_prompt_hit_leaves_one_token() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    p = list(range(8))
    assert kv.allocate_slots("a", p, 0, 8)
    kv.cache_computed("a", p, 8)
    kv.free("a")
    hit, n = kv.get_computed_blocks("b", p)
    assert n == 4  # not 8: the last token must be computed to produce logits


def test_blocks_are_published_only_once_computed() -> None:
    """Allocation publishes nothing: a step that fails after scheduling must leave no findable block."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    p = list(range(12))
    assert kv.allocate_slots("a", p, 0, 12)
    assert kv.get_computed_blocks("x", p) == ([], 0)
    kv.cache_computed("a", p, 6)  # a chunk of 6 tokens ran: one block is full
    assert kv.get_computed_blocks("y", p)[1] == 4
    kv.free("a")  # e.g. failed in its next step: what was computed stays shared, nothing more
    assert kv.get_computed_blocks("z", p)[1] == 4


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.allocate_slots("a", list(range(5)), 0, 5)
    assert not kv.allocate_slots("b", list(range(100, 105)), 0, 5)
    assert kv.block_ids("b") == [] and kv.num_request_blocks() == 2
    assert kv.allocate_slots("a", list(range(8)), 5, 3)  # grows within its last block
    assert not kv.allocate_slots("a", list(range(9)), 8, 1)
