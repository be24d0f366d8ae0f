"""n-gram (prompt lookup) drafts: a request's next tokens guessed from its own prompt and output.

The draft is the k tokens that followed the latest earlier occurrence of the longest suffix n-gram
(prompt_lookup_max down to prompt_lookup_min) of prompt + output. Verification reuses the multi-token
path of chunked prefill, so the guesses cost one forward over 1 + k rows and are free when wrong but
for the rows. Requests whose drafts keep failing back off (SpecBackoff) so they pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import SpeculativeConfig

# Tokens searched back from the end for a match: bounds a step's proposal cost at O(LOOKBACK * max n).
LOOKBACK = 4096


def propose_ngram(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
    """Up to min(k, max_tokens) drafted tokens for the sequence `token_ids`, or [] when no n-gram recurs."""
    k = min(cfg.num_speculative_tokens, max_tokens)
    n_tok = min(len(token_ids), LOOKBACK)
    if k <= 0 or n_tok <= cfg.prompt_lookup_min:
        return []
    seq = np.asarray(token_ids[-n_tok:], dtype=np.int64)  # [L]
    for n in range(min(cfg.prompt_lookup_max, n_tok - 1), cfg.prompt_lookup_min - 1, -1):
        suffix = seq[-n:]  # [n]
        # windows starting at 0..L-1-n: each has a token after it, and none is the suffix itself
        win = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # [L - n, n]
        hits = np.flatnonzero((win == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: in a repeating loop, the freshest copy
            return seq[start:start + k].tolist()
    return []


@dataclass
class SpecBackoff:
    """Per request: after MISSES drafted steps in a row with nothing accepted, skip drafting for a number of
    steps that doubles each time (up to MAX_SKIP), so a request with no repetition runs as without drafts."""

    MISSES = 2
    MAX_SKIP = 64
    misses: int = 0
    skip: int = 0  # steps left without drafting
    next_skip: int = 4

    def should_draft(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def record(self, num_accepted: int) -> None:
        if num_accepted > 0:
            self.misses, self.next_skip = 0, 4
            return
        self.misses += 1
        if self.misses >= self.MISSES:
            self.misses, self.skip = 0, self.next_skip
            self.next_skip = min(self.next_skip * 2, self.MAX_SKIP)
