"""Running aggregates of AttnRes depth weights over all served tokens (opt-in, for metrics).

Per mixing site: the mean weight on each of its sources and the mean entropy of its weights.
Series stay few (one per site and source), so Prometheus labels remain small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def site_labels(num_sites: int) -> list[str]:
    """Names of the mixing sites in forward order: layer i's attention and MLP, then the output head. The
    plots of `depthserve inspect` and the metrics' `site` label use the same names."""
    return [*(f"L{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(num_sites - 1)), "output"]


def source_label(j: int) -> str:
    """Name of a site's j-th source: the embedding, then completed blocks; a site's last is its partial sum."""
    return "emb" if j == 0 else f"src{j}"


def entropy(weights: list[float]) -> float:
    """Shannon entropy (nats) of one site's weights over its sources."""
    return -sum(w * math.log(w) for w in weights if w > 0)


@dataclass(frozen=True)
class DepthStatsSnapshot:
    tokens: int
    mean_weight: list[list[float]]  # [site][source]
    mean_entropy: list[float]  # [site]


class DepthStats:
    def __init__(self) -> None:
        self.tokens = 0
        self._sum: list[list[float]] = []
        self._entropy: list[float] = []

    def add(self, entry: list[list[float]]) -> None:
        """One token's weights: per site, the weights over its sources."""
        if not self._sum:
            self._sum = [[0.0] * len(site) for site in entry]
            self._entropy = [0.0] * len(entry)
        for s, site in enumerate(entry):
            acc = self._sum[s]
            for j, w in enumerate(site):
                acc[j] += w
            self._entropy[s] += entropy(site)
        self.tokens += 1

    def snapshot(self) -> DepthStatsSnapshot:
        n = max(self.tokens, 1)
        return DepthStatsSnapshot(self.tokens, [[v / n for v in site] for site in self._sum],
                                  [e / n for e in self._entropy])
