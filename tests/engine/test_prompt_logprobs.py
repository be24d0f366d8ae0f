"""Prompt logprobs (vLLM's SamplingParams.prompt_logprobs) equal the reference forward's, whatever the chunking,
prefix cache, batch, n or number of logits pieces."""

from __future__ import annotations

import pytest
import torch

import models.llama
from engine import LLM, SamplingParams
from engine.outputs import RequestOutputKind
from tests.tiny import PROMPTS, reference_greedy, tiny_config, write_tiny

PROMPT = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 30, 31]
OTHER = [1, 5, 6, 7, 8, 9, 10, 11, 40, 41, 42]


@pytest.fixture(scope="module", params=[("none", 0, 2), ("block", 2, 5), ("full", 0, 3)], ids=["std", "block", "full"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    return write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))


def _reference(ref, ids: list[int]) -> torch.Tensor:
    """[T, V] log-probabilities of the token after each position (full recompute, no cache)."""
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids]))[0].float(), dim=-1)


def _check(lps, ref, ids: list[int], k: int) -> None:
    want = _reference(ref, ids)
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        lp, row = lps[p], want[p - 1]
        assert lp.token_id == ids[p]
        assert lp.logprob == pytest.approx(float(row[ids[p]]), abs=1e-4)
        assert lp.rank == int((row > row[ids[p]]).sum()) + 1
        top_v, top_i = row.topk(k)
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-4)


def test_equal_to_reference_chunked_cached_batched(model) -> None:
    folder, ref = model
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=5)  # chunks of at most 5 rows
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1))  # warm the prefix cache
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": OTHER}, {"prompt_token_ids": PROMPT}],
                        [params, SamplingParams(max_tokens=4, ignore_eos=True), params])
    for o in (outs[0], outs[2]):
        _check(o.prompt_logprobs, ref, PROMPT, 3)
        gen = o.outputs[0]
        full = _reference(ref, PROMPT + gen.token_ids)
        for j, (tok, lp) in enumerate(zip(gen.token_ids, gen.logprobs, strict=True)):  # the generated ones too
            assert lp.logprob == pytest.approx(float(full[len(PROMPT) - 1 + j, tok]), abs=1e-4)
    assert outs[1].prompt_logprobs is None
    assert llm.engine.kv_blocks_held_by_requests() == 0


def test_preemption_recomputes_without_scoring_twice(model) -> None:
    folder, ref = model
    # 16 blocks of 4 tokens hold one request but not all four prompts' growth: decode steps preempt
    llm = LLM(str(folder), max_model_len=64, block_size=4, num_kv_blocks=16, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    for p, o in zip(PROMPTS, outs, strict=True):
        _check(o.prompt_logprobs, ref, p, 1)
        assert o.outputs[0].token_ids == reference_greedy(ref, p, 10)
    assert llm.engine.kv_blocks_held_by_requests() == 0


def test_n_samples_streaming_and_pieces(model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, ref = model
    monkeypatch.setattr(models.llama, "LOGITS_PIECE_ROWS", 3)  # several logits pieces per chunk
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=16)
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=2, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, params)[0]
    _check(out.prompt_logprobs, ref, PROMPT, 0)
    assert len(out.outputs) == 2
    # DELTA outputs: the prompt logprobs come once per sample, in its first output
    eng = llm.engine
    eng.add_request({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, n=2, max_tokens=3, ignore_eos=True, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA),
        "s")
    seen: dict[int, int] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            for c in o.outputs:
                if c.index not in seen:
                    seen[c.index] = 0
                    assert o.prompt_logprobs is not None, "the first output of a sample carries them"
                    _check(o.prompt_logprobs, ref, PROMPT, 1)
                else:
                    assert o.prompt_logprobs is None
    assert sorted(seen) == [0, 1]


def test_one_token_prompt_and_bad_values(model) -> None:
    folder, _ = model
    llm = LLM(str(folder), max_model_len=64)
    out = llm.generate({"prompt_token_ids": [1]}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
