"""Drafts for speculative decoding: n-gram (prompt lookup) proposals, and the bookkeeping both methods share.

Method depth (self-speculation of an AttnRes model by early exit) is proposed by the model runner itself
(ModelRunner._depth_drafts): the scheduler schedules its 1 + k rows with DRAFT_PLACEHOLDER tokens.

n-gram (prompt lookup) drafts: a request's next tokens guessed from its own prompt and output.

The draft is the k tokens that followed the latest earlier occurrence of the longest suffix n-gram
(prompt_lookup_max down to prompt_lookup_min) of prompt + output. Verification reuses the multi-token
path of chunked prefill, so the guesses cost one forward over 1 + k rows and are free when wrong but
for the rows. Requests whose drafts keep failing back off (SpecBackoff) so they pay nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.config import SpeculativeConfig

# A draft token the runner fills in before verification (method depth): never a vocabulary id.
DRAFT_PLACEHOLDER = -1

# Tokens searched back from the end for a match: bounds a step's proposal cost at O(LOOKBACK * max n).
LOOKBACK = 4096


def propose_ngram(token_ids: Sequence[int] | np.ndarray, cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
    """Up to min(k, max_tokens) drafted tokens for the sequence `token_ids`, or [] when no n-gram recurs.

    One vectorised pass finds the earlier positions holding the last token; the few candidates are then
    extended backwards together, so a step costs O(LOOKBACK) numpy work, not O(LOOKBACK * n)."""
    k = min(cfg.num_speculative_tokens, max_tokens)
    if k <= 0 or len(token_ids) <= cfg.prompt_lookup_min:
        return []
    seq = np.asarray(token_ids[-LOOKBACK:], dtype=np.int64)  # [L]
    n_max = min(cfg.prompt_lookup_max, len(seq) - 1)
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # [C] earlier positions ending a length-1 match
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)  # [C] how far each match reaches back (up to n_max)
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, n_max):
        alive &= ends >= j
        alive[alive] = seq[ends[alive] - j] == seq[-1 - j]
        if not alive.any():
            break
        length += alive
    best = int(length.max())
    if best < cfg.prompt_lookup_min:
        return []
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1  # the latest: in a loop, the freshest copy
    return seq[start:start + k].tolist()


class TokenMirror:
    """A request's tokens as a growing numpy buffer, appended to as it decodes, so proposing never converts
    the whole Python list again."""

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """token_ids (which only ever grow) as an array view."""
        if len(token_ids) > self.buf.size:
            grown = np.empty(max(len(token_ids), 2 * self.buf.size), dtype=np.int64)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if len(token_ids) > self.n:
            self.buf[self.n:len(token_ids)] = token_ids[self.n:]
            self.n = len(token_ids)
        return self.buf[:self.n]


@dataclass
class SpecBackoff:
    """Per request: after MISSES drafted steps in a row with nothing accepted, skip drafting for a number of
    steps that doubles each time (up to MAX_SKIP), so a request with no repetition runs as without drafts.

    The draft length also follows acceptance: one token after a step that accepted nothing, twice the length after
    one that accepted all (back to k in log2(k) steps), unchanged after a partial one. A verifying row is not free
    once the linears are compute bound (on a 2-core CPU a 5-row bf16 step costs about 1.4 plain ones), so a
    request whose drafts keep failing probes with one token, not k."""

    MISSES = 2
    MAX_SKIP = 64
    misses: int = 0
    skip: int = 0  # steps left without drafting
    next_skip: int = 4
    length: int | None = None  # the next draft's length (capped by k); None until the first verified step: k
    tokens: TokenMirror = field(default_factory=TokenMirror)

    def draft_len(self, k: int) -> int:
        """How many tokens to draft (1..k) given the last verified step."""
        return k if self.length is None else min(k, self.length)

    def should_draft(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def record(self, num_accepted: int, num_drafted: int | None = None) -> None:
        """A verified step accepted `num_accepted` of its `num_drafted` drafts."""
        if num_drafted is not None and num_accepted == 0:
            self.length = 1
        elif num_drafted is not None and num_accepted >= num_drafted:
            self.length = 2 * num_drafted
        if num_accepted > 0:
            self.misses, self.next_skip = 0, 4
            return
        self.misses += 1
        if self.misses >= self.MISSES:
            self.misses, self.skip = 0, self.next_skip
            self.next_skip = min(self.next_skip * 2, self.MAX_SKIP)
