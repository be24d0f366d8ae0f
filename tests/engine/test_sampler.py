"""engine.sampler.Sampler's random rows: the inverse-CDF draw matches the target distribution (statistically,
with top-k / top-p / min-p too), never returns a zero-probability token (forced uniforms at both ends), keeps
tail probabilities an fp32 cumsum would lose, and keeps seeded rows independent of their batch."""

from __future__ import annotations

import math

import pytest
import torch

from engine import sampler as sampler_mod
from engine.request import Request
from engine.sampler import CDF_BLOCK, Sampler
from engine.sampling_params import SamplingParams

N = 20_000  # samples per statistical check
ONE_BELOW = 1 - 2**-53  # the largest fp64 uniform torch.rand returns


def _reqs(n: int, **kw: object) -> list[Request]:
    return [Request(f"r{i}", [1], SamplingParams(**kw)) for i in range(n)]


def _frequencies(row: torch.Tensor, **kw: object) -> torch.Tensor:
    """Empirical token frequencies of N draws from one logits row (N identical rows of one batch)."""
    ids = Sampler(seed=0)(row.expand(N, -1).contiguous(), _reqs(N, **kw)).token_ids
    return torch.bincount(torch.tensor(ids), minlength=row.shape[0]).double() / N


def _target(row: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0) -> torch.Tensor:
    """The distribution the parameters define (top-k, then top-p on what top-k kept, then min-p), computed
    here independently of the sampler, in fp64."""
    p = torch.softmax(row.double() / temperature, -1)
    order = p.argsort(descending=True).tolist()
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    mass, keep = 0.0, torch.zeros_like(p, dtype=torch.bool)
    for t in order:
        if mass >= top_p:  # the smallest set whose mass reaches top_p
            break
        keep[t], mass = True, mass + float(p[t])
    p = torch.where(keep, p, 0.0)
    p = torch.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def _assert_matches(freq: torch.Tensor, target: torch.Tensor) -> None:
    """No draw outside the support; chi-square within ~6 sigma of its degrees of freedom; every token within
    5 binomial standard deviations (+ one count)."""
    support = target > 0
    assert freq[~support].sum() == 0, f"zero-probability tokens drawn: {(~support & (freq > 0)).nonzero()}"
    expected, observed = N * target[support], N * freq[support]
    assert expected.min() >= 20, "test set-up: too few expected draws per token for chi-square"
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6, f"chi2 {chi2:.1f} with {df} degrees of freedom"
    assert ((freq - target).abs() <= 5 * (target * (1 - target) / N).sqrt() + 1 / N).all()


def _scattered(vocab: int, support: list[int], seed: int = 0) -> torch.Tensor:
    """Logits that are -inf except at `support`, where they lie in [0, 2]."""
    g = torch.Generator().manual_seed(seed)
    row = torch.full((vocab,), float("-inf"))
    row[support] = 2 * torch.rand(len(support), generator=g)
    return row


# tokens in every block of a 600-token vocabulary (blocks of 256, the last one padded), both ends included
SPREAD = [0, 1, 7, 100, 254, 255, 256, 257, 300, 400, 510, 511, 512, 513, 550, 598, 599]


@pytest.mark.parametrize(("vocab", "support"), [(10, list(range(10))), (600, SPREAD)], ids=["one-block", "blocks"])
def test_frequencies_match_the_distribution(vocab: int, support: list[int]) -> None:
    assert vocab % CDF_BLOCK or vocab < CDF_BLOCK  # the padded last block is covered
    row = _scattered(vocab, support)
    _assert_matches(_frequencies(row, temperature=0.7), _target(row, 0.7))


@pytest.mark.parametrize("params", [{"top_k": 5}, {"top_p": 0.6}, {"top_k": 8, "top_p": 0.8}, {"min_p": 0.3}],
                         ids=["top-k", "top-p", "top-k+top-p", "min-p"])
def test_frequencies_match_after_filtering(params: dict[str, float]) -> None:
    row = _scattered(600, SPREAD, seed=1)
    _assert_matches(_frequencies(row, temperature=0.9, **params), _target(row, 0.9, **params))


def test_a_wrong_distribution_fails_the_check() -> None:
    """The check has power: draws from the unfiltered distribution fail against the top-p target."""
    row = _scattered(600, SPREAD, seed=1)
    with pytest.raises(AssertionError):
        _assert_matches(_frequencies(row, temperature=0.9), _target(row, 0.9, top_p=0.6))
    flat = torch.zeros(10)  # uniform against a mildly tilted target
    tilted = _target(torch.linspace(0, 0.3, 10))
    with pytest.raises(AssertionError):
        _assert_matches(_frequencies(flat), tilted)


def _forced(sampler: Sampler, monkeypatch: pytest.MonkeyPatch, u: float) -> None:
    monkeypatch.setattr(sampler, "_uniforms", lambda reqs, device: torch.full((len(reqs), 1), u, dtype=torch.float64))


@pytest.mark.parametrize("u", [0.0, 0.5, ONE_BELOW, 1.0])  # 1.0 never comes from torch.rand: the guard's case
@pytest.mark.parametrize("token", [0, 5, 255, 256, 511, 599])
def test_a_single_possible_token_is_always_drawn(token: int, u: float, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Sampler()
    _forced(s, monkeypatch, u)
    row = torch.full((1, 600), float("-inf"))
    row[0, token] = 3.0
    assert s(row, _reqs(1, temperature=1.0)).token_ids == [token]
    near_zero = torch.full((1, 600), -1e4)  # the others' probabilities underflow to exactly 0 in fp32
    near_zero[0, token] = 0.0
    assert s(near_zero, _reqs(1, temperature=1.0)).token_ids == [token]


@pytest.mark.parametrize(("u", "want"), [(0.0, 3), (ONE_BELOW, 511), (1.0, 511)])
def test_the_ends_of_the_uniform_land_on_possible_tokens(u: float, want: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero-probability tokens before the first and after the last possible one (the padding too) are skipped."""
    s = Sampler()
    _forced(s, monkeypatch, u)
    assert s(_scattered(600, [3, 257, 300, 511])[None], _reqs(1)).token_ids == [want]
    # filtered: top-k 2 keeps the two largest logits of a descending row, whatever the uniform
    row = torch.arange(600, 0, -1, dtype=torch.float32)[None] / 100
    assert s(row, _reqs(1, top_k=2)).token_ids == [0 if u == 0.0 else 1]
    assert s(row, _reqs(1, top_p=1e-6)).token_ids == [0]


def test_tail_tokens_keep_their_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token of probability 1e-9 right after a running mass of 0.75 is drawn when the uniform falls in its
    interval (an fp32 cumsum steps by 6e-8 there and could never return it), in the first block and in a later one."""
    s = Sampler()
    for offset in (0, 2 * CDF_BLOCK + 7):
        probs = torch.zeros(1, 3 * CDF_BLOCK)
        probs[0, offset:offset + 3] = torch.tensor([0.75, 1e-9, 0.25])
        total = float(probs.double().sum())
        for frac, want in ((0.25e-9, offset + 1), (0.75e-9, offset + 1), (-1e-10, offset), (1.1e-9, offset + 2)):
            _forced(s, monkeypatch, (0.75 + frac) / total)
            assert s._inverse_cdf(probs, _reqs(1)).tolist() == [want], (offset, frac)


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(4, 700, generator=g)

    def seeded() -> Request:
        return Request("s", [1], SamplingParams(temperature=1.0, seed=42))

    alone, r = Sampler(seed=1), seeded()
    want = [alone(logits[1:2], [r]).token_ids[0] for _ in range(30)]
    busy, r = Sampler(seed=2), seeded()
    others = [Request("a", [1], SamplingParams(temperature=0.7)), r, Request("g", [1], SamplingParams(temperature=0)),
              Request("b", [1], SamplingParams(temperature=1.3, seed=7, top_p=0.9))]
    got = [busy(logits, others).token_ids[1] for _ in range(30)]
    assert got == want and len(set(want)) > 5


def test_greedy_rows_take_the_argmax_in_a_mixed_batch() -> None:
    logits = torch.randn(6, 700, generator=torch.Generator().manual_seed(3))
    reqs = [Request(str(i), [1], SamplingParams(temperature=0 if i % 2 else 1.0)) for i in range(6)]
    ids = Sampler()(logits, reqs).token_ids
    assert [ids[i] for i in (1, 3, 5)] == logits[[1, 3, 5]].argmax(-1).tolist()
    assert Sampler()(logits, _reqs(6, temperature=0)).token_ids == logits.argmax(-1).tolist()


# ---- top-k / top-p from candidates: equal to sorting whole rows -----------------------------------------


def _sorted_reference(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Whole-row sorting for the rows that filter; the others untouched."""
    out = sampler_mod._top_k_top_p_sorted(logits.clone(), top_k, top_p)
    on = ((top_k < logits.shape[1]) | (top_p < 1)).unsqueeze(1)
    return torch.where(on, out, logits)


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat (spills past every cap) to peaked
def test_candidate_top_k_top_p_equals_whole_row_sorting(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = 600
    monkeypatch.setattr(sampler_mod, "TOP_CANDIDATES", (16, 64))  # small caps: every path at a small vocab
    gen = torch.Generator().manual_seed(int(scale * 10))
    # rows: top-p only, top-k inside the first cap, between the caps, above the caps, both, neither
    top_k = torch.tensor([vocab, 5, 40, 300, 10, vocab, 64, vocab])
    top_p = torch.tensor([0.9, 1.0, 1.0, 1.0, 0.5, 1.0, 0.95, 0.999999], dtype=torch.float64)
    for _ in range(5):
        logits = torch.randn(len(top_k), vocab, generator=gen) * scale
        got = sampler_mod._top_k_top_p(logits.clone(), top_k, top_p)
        want = _sorted_reference(logits, top_k, top_p)
        assert torch.equal(got.isinf(), want.isinf())
        assert torch.equal(got[~got.isinf()], want[~want.isinf()])
        kept = (~got.isinf()).sum(1)
        assert bool((kept[1:5] <= top_k[1:5]).all()) and int(kept[5]) == vocab  # the untouched row


def test_candidate_top_p_spills_to_the_next_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A top-p set larger than the first cap is found by the next one, and one larger than every cap by
    sorting the row: both equal the reference."""
    monkeypatch.setattr(sampler_mod, "TOP_CANDIDATES", (8, 32))
    logits = torch.linspace(0, 0.1, 100).repeat(3, 1)  # distinct values: no ties at a boundary
    logits[0, :20] += 5.0  # ~20 tokens for top-p 0.9: past 8, inside 32
    logits[1] = torch.linspace(0, 0.1, 100)  # nearly uniform: ~90 tokens, past every cap
    logits[2, 3] += 30.0  # one token
    top_k, top_p = torch.full((3,), 100), torch.full((3,), 0.9, dtype=torch.float64)
    got = sampler_mod._top_k_top_p(logits.clone(), top_k, top_p)
    assert torch.equal(got.isinf(), _sorted_reference(logits, top_k, top_p).isinf())
    n0, n1, n2 = (int(n) for n in (~got.isinf()).sum(1))
    assert 8 < n0 <= 32 and n1 > 32 and n2 == 1
