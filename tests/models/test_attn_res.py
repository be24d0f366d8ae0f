"""The two-phase Block AttnRes schedule and the folded-key mix equal the naive mix of docs/attnres.md."""

from __future__ import annotations

import pytest
import torch

from models.attn_res import key_of, mix_sources, phase1, phase2_fused
from models.reference import naive_mix

EPS = 1e-6


def _random(t: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(t, n, d, generator=g) * torch.rand(t, n, 1, generator=g) * 4  # varied norms
    partial = torch.randn(t, d, generator=g)
    w = torch.randn(d, generator=g)
    gain = 0.5 + torch.rand(d, generator=g)
    return blocks, partial, w, gain


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_two_phase_equals_naive_mix(n: int) -> None:
    t, d = 7, 48
    blocks, partial, w, gain = _random(t, n, d, seed=n)
    queries = torch.stack([w, -w, w * 2])  # several queries of one block, scored at once
    lse, xo = phase1(blocks, key_of(blocks, EPS), queries * gain)
    for j in range(queries.shape[0]):
        x = phase2_fused(lse[:, j], xo[:, j], partial, queries[j] * gain, EPS)  # the serving path's kernels
        ref, alpha = naive_mix(queries[j], gain, torch.cat([blocks, partial.unsqueeze(1)], dim=1), EPS)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
        w_partial = torch.sigmoid(key_of(partial, EPS) @ (queries[j] * gain) - lse[:, j])  # the merge weight
        torch.testing.assert_close(w_partial, alpha[:, -1], rtol=1e-5, atol=1e-6)


def test_phase1_alone_is_the_block_start_mix() -> None:
    """The attention sublayer that opens a block mixes only completed blocks: Phase 1 normalised."""
    blocks, _, w, gain = _random(5, 4, 32, seed=3)
    _, xo = phase1(blocks, key_of(blocks, EPS), (w * gain).unsqueeze(0))
    ref, _ = naive_mix(w, gain, blocks, EPS)
    torch.testing.assert_close(xo[:, 0], ref, rtol=1e-5, atol=1e-5)


def test_phase1_writes_into_pool_views() -> None:
    blocks, _, w, gain = _random(4, 3, 16, seed=4)
    q = torch.stack([w, w * 0.5]) * gain
    out = (torch.empty(4, 2), torch.empty(4, 2, 16))
    lse, xo = phase1(blocks, key_of(blocks, EPS), q, out=out)
    assert lse.data_ptr() == out[0].data_ptr() and xo.data_ptr() == out[1].data_ptr()
    torch.testing.assert_close((lse, xo), phase1(blocks, key_of(blocks, EPS), q))


def test_folded_mix_equals_naive_mix_and_sums_to_one() -> None:
    blocks, _, w, gain = _random(6, 5, 24, seed=5)
    x, alpha = mix_sources(blocks, key_of(blocks, EPS), w * gain)
    ref, ref_alpha = naive_mix(w, gain, blocks, EPS)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(6))


def test_zero_query_is_uniform_average() -> None:
    blocks, _, _, gain = _random(3, 4, 8, seed=6)
    x, alpha = naive_mix(torch.zeros(8), gain, blocks, EPS)
    torch.testing.assert_close(alpha, torch.full((3, 4), 0.25))
    torch.testing.assert_close(x, blocks.mean(1))
