"""Depth drafts (speculative method "depth"): a Block AttnRes model's early exit after `exit_block` blocks drafts
for the full model. Greedy output identical to the reference and to non-speculative decoding for every exit
block (N dividing the layers or not), drafts equal to a plain truncated reference, max_tokens/stops/penalties/
logprobs as without drafts, requests that must not draft do not, config errors at construction, TP=2."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from engine.config import SpeculativeConfig
from engine.model_runner import ModelRunner
from models.reference import ReferenceLlama
from tests.engine.test_spec_decode import _assert_idle
from tests.engine.test_spec_decode import _greedy as _generate  # the same MAX (24) tokens
from tests.tiny import PROMPTS, reference_greedy, tiny_config, write_tiny

REPEAT = [[1, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [1, 30, 31, 30, 31, 30, 31, 30]]
MAX = 24


def depth_spec(exit_block: int, k: int = 3) -> dict:
    return {"method": "depth", "num_speculative_tokens": k, "exit_block": exit_block}


# (attn_res_block_size, layers): N = 3 blocks over 5 layers (the last one short), N = 4 over 4 layers
@pytest.fixture(scope="module", params=[(2, 5), (1, 4)], ids=lambda c: f"bs{c[0]}-L{c[1]}")
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    bs, layers = request.param
    folder, model = write_tiny(tmp_path_factory.mktemp("m"), tiny_config("block", bs, layers=layers))
    prompts = [*REPEAT, *PROMPTS]
    num_blocks = -(-layers // bs)
    return folder, model, prompts, [reference_greedy(model, p, MAX) for p in prompts], num_blocks


def _truncated(model: ReferenceLlama, layers: int) -> ReferenceLlama:
    """The reference with only its first `layers` decoder layers: its output head mixes the block states that
    exist after them (the plain early exit a depth draft must equal)."""
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:layers]
    return short


@pytest.mark.parametrize("kw", [{}, {"block_size": 4, "max_num_batched_tokens": 7},
                                {"block_size": 2, "num_kv_blocks": 40, "max_num_batched_tokens": 16},
                                {"kernels": "reference", "max_num_batched_tokens": 9}],
                         ids=["batched", "small-budget", "preemption", "reference-kernels"])
def test_greedy_matches_reference_for_every_exit_block(tiny, kw) -> None:
    folder, _, prompts, expected, n = tiny
    for exit_block in range(1, n):
        got, llm = _generate(folder, prompts, speculative_config=depth_spec(exit_block), **kw)
        assert got == expected, exit_block
        st = llm.engine.scheduler.stats
        assert st.spec_num_drafts > 0 and 0 < st.spec_num_accepted_tokens <= st.spec_num_draft_tokens
        assert sum(st.spec_accepted_per_pos) == st.spec_num_accepted_tokens
        assert st.generation_tokens == len(prompts) * MAX
        _assert_idle(llm)


def test_drafts_equal_the_truncated_reference(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every draft the runner makes is the argmax of the reference cut after exit_block blocks, given the
    request's tokens and the drafts before it."""
    folder, model, prompts, expected, n = tiny
    seen: list[tuple[list[int], tuple[int, ...]]] = []
    original = ModelRunner._depth_drafts

    def spy(self: ModelRunner, rows) -> None:
        original(self, rows)
        seen.extend((list(r.token_ids), d) for r, d in zip(rows.reqs, rows.drafts, strict=True) if d)

    monkeypatch.setattr(ModelRunner, "_depth_drafts", spy)
    monkeypatch.setattr("engine.spec_decode.SpecBackoff.should_draft", lambda self: True)
    bs = model.cfg.attn_res_block_size
    for exit_block in range(1, n):
        seen.clear()
        got, _ = _generate(folder, prompts, speculative_config=depth_spec(exit_block, k=4))
        assert got == expected
        short = _truncated(model, exit_block * bs)
        assert len(seen) > 10
        with torch.no_grad():
            for tokens, drafts in seen:
                ids = list(tokens)
                for d in drafts:
                    assert int(short(torch.tensor([ids]))[0, -1].argmax()) == d
                    ids.append(d)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 11])
def test_max_tokens_exact(tiny, max_tokens: int) -> None:
    folder, _, prompts, expected, _ = tiny
    got, llm = _generate(folder, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                         speculative_config=depth_spec(1, k=4))
    assert got == [e[:max_tokens] for e in expected]
    _assert_idle(llm)


@pytest.mark.parametrize("pen", [{}, {"repetition_penalty": 1.3}, {"frequency_penalty": 0.7, "presence_penalty": 0.4}],
                         ids=["plain", "repetition", "frequency-presence"])
def test_penalties_and_logprobs_match_non_speculative(tiny, pen: dict) -> None:
    folder, _, prompts, _, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, logprobs=2, **pen)
    plain = LLM(str(folder), max_model_len=64).generate([{"prompt_token_ids": p} for p in prompts], params)
    spec = LLM(str(folder), max_model_len=64, speculative_config=depth_spec(1))
    got = spec.generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(plain, got, strict=True):
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(la) == len(lb) == MAX
        for x, y in zip(la, lb, strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert spec.engine.scheduler.stats.spec_num_accepted_tokens > 0


def test_stop_token_inside_accepted_drafts(tiny) -> None:
    folder, _, prompts, expected, _ = tiny
    llm = LLM(str(folder), max_model_len=64, speculative_config=depth_spec(2 if tiny[4] > 2 else 1))
    for p, e in zip(prompts, expected, strict=True):
        stop = e[-4]
        params = SamplingParams(temperature=0, max_tokens=MAX, stop_token_ids=[stop], ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": p}], params)[0].outputs[0]
        assert out.token_ids == e[:e.index(stop) + 1] and out.finish_reason == "stop"
    _assert_idle(llm)


def test_sampling_runs_seeded_and_honours_max_tokens(tiny) -> None:
    folder, _, prompts, _, _ = tiny
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=MAX, ignore_eos=True, seed=7)
    a, _ = _generate(folder, prompts, params, speculative_config=depth_spec(1))
    b, llm = _generate(folder, prompts, params, speculative_config=depth_spec(1))
    assert a == b and all(len(t) == MAX for t in a)
    assert llm.engine.scheduler.stats.spec_num_drafts > 0
    _assert_idle(llm)


def test_requests_that_must_not_draft(tiny) -> None:
    """min_tokens pending and depth-weight records: no drafts for those requests, output unchanged."""
    folder, _, prompts, expected, _ = tiny
    got, llm = _generate(folder, prompts[:2], SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True,
                                                             min_tokens=MAX), speculative_config=depth_spec(1))
    assert got == expected[:2] and llm.engine.scheduler.stats.spec_num_drafts == 0
    got, llm = _generate(folder, prompts[:2], SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True,
                                                             depth_attention=True),
                         speculative_config=depth_spec(1))
    assert got == expected[:2] and llm.engine.scheduler.stats.spec_num_drafts == 0


def test_metrics_counters_move(tiny) -> None:
    folder, _, prompts, _, _ = tiny
    _, llm = _generate(folder, prompts, speculative_config=depth_spec(1))
    s = llm.engine.stats()
    assert s.spec_decode_num_drafts > 0 and s.spec_decode_num_draft_tokens >= s.spec_decode_num_drafts
    assert 0 < s.spec_decode_num_accepted_tokens == sum(s.spec_decode_num_accepted_tokens_per_pos)
    assert len(s.spec_decode_num_accepted_tokens_per_pos) == 3


def test_config_validation() -> None:
    cfg = EngineArgs(speculative_config='{"method": "depth", "exit_block": 2}').create_engine_config()
    assert cfg.speculative == SpeculativeConfig(method="depth", exit_block=2)
    for bad, key in [({"method": "depth"}, "exit_block"), ({"method": "depth", "exit_block": 0}, "exit_block"),
                     ({"method": "depth", "exit_block": True}, "exit_block"),
                     ({"method": "depth", "exit_block": 1, "prompt_lookup_min": 1}, "prompt_lookup_min"),
                     ({"method": "ngram", "exit_block": 1}, "exit_block"),
                     ({"method": "depth", "exit_block": 1, "num_speculative_tokens": 0}, "num_speculative_tokens")]:
        with pytest.raises(ValueError, match=key):
            EngineArgs(speculative_config=bad).create_engine_config()


def test_model_checked_at_construction(tiny, tmp_path: Path) -> None:
    folder, _, _, _, n = tiny
    with pytest.raises(ValueError, match=rf"exit_block must be < the model's number of blocks \({n}"):
        LLM(str(folder), max_model_len=64, speculative_config=depth_spec(n))
    for mode in ("full", "none"):
        other, _ = write_tiny(tmp_path / mode, tiny_config(mode, 0, layers=2))
        with pytest.raises(ValueError, match="method \"depth\" needs a Block AttnRes model"):
            LLM(str(other), max_model_len=64, speculative_config=depth_spec(1))


@pytest.mark.slow
def test_tp2_depth_drafts(tmp_path: Path) -> None:
    """The draft passes are forwards like any other (an early-exit ForwardBatch): TP=2 workers run them too."""
    folder, model = write_tiny(tmp_path / "m", tiny_config("block", 1, layers=3))
    prompts = [*REPEAT, *PROMPTS[:2]]
    expected = [reference_greedy(model, p, 12) for p in prompts]
    with LLM(str(folder), tensor_parallel_size=2, max_model_len=64, num_threads=1,
             speculative_config=depth_spec(2)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert llm.engine.scheduler.stats.spec_num_accepted_tokens > 0
        assert llm.engine.kv_blocks_held_by_requests() == 0
    assert [o.outputs[0].token_ids for o in outs] == expected
