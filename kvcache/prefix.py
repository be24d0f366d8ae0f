"""Chained block hashes for prefix caching.

A full block's hash covers its tokens and, through the parent hash, every token before it, so
equal hashes mean equal prefixes. sha256 (not Python's hash) keeps one user's prompt from being
matched by a crafted collision from another.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = b"depthserve-root"


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, start_block: int = 0,
                     parent: BlockHash = ROOT_HASH, num_tokens: int | None = None) -> list[BlockHash]:
    """Hashes of the full blocks among the first `num_tokens` (default: all) of `token_ids`, from
    `start_block` on, chained from `parent`, the hash of the block before `start_block`. A partial
    tail is not hashed."""
    end = len(token_ids) if num_tokens is None else num_tokens
    out = []
    for b in range(start_block, end // block_size):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out
