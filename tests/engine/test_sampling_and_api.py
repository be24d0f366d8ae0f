"""Sampling parameters, stop conditions, logprobs, bad input and aborts through the offline API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.outputs import RequestOutputKind
from engine.request import Request
from engine.sampler import Sampler
from tests.tiny import reference_greedy, tiny_config, write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    return write_tiny(tmp_path_factory.mktemp("m"), tiny_config("block", 2, layers=3), tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(str(tiny[0]), max_model_len=128, seed=1)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_request_is_independent_of_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    noisy = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": [1, 9, 8, 7]}, seeded)[0].outputs[0].token_ids
    batch = llm.generate([{"prompt_token_ids": [1, 3, 3]}, {"prompt_token_ids": [1, 9, 8, 7]},
                          {"prompt_token_ids": [1, 5] * 6}], [noisy, seeded, noisy])
    assert batch[1].outputs[0].token_ids == alone
    other = llm.generate({"prompt_token_ids": [1, 9, 8, 7]}, SamplingParams(temperature=1.0, seed=99,
                                                                           max_tokens=12, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM, tiny) -> None:
    prompt = [1, 40, 50, 60]
    want = reference_greedy(tiny[1], prompt, 8)
    for p in (SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, min_p=0.999, max_tokens=8, ignore_eos=True)):
        assert llm.generate({"prompt_token_ids": prompt}, p)[0].outputs[0].token_ids == want


def test_stop_token_ids_and_min_tokens(llm: LLM, tiny) -> None:
    prompt = [1, 11, 12, 13]
    want = reference_greedy(tiny[1], prompt, 8)
    stop = want[3]
    first = want.index(stop)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == want[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=8, min_tokens=8, stop_token_ids=[stop]))[0].outputs[0]
    assert len(out.token_ids) == 8 and stop not in out.token_ids and out.finish_reason == "length"


def test_stop_string_truncates_text(llm: LLM) -> None:
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("To be, or not", p)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate("To be, or not", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                      stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    out = llm.generate("To be, or not", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == full[: full.index(stop) + len(stop)]


def test_logprobs_match_reference(llm: LLM, tiny) -> None:
    prompt = [1, 70, 71]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=3, logprobs=3, ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(tiny[1](torch.tensor([prompt]))[0, -1], -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(ref.argmax())
    assert lp.logprob == pytest.approx(float(ref.max()), abs=1e-4)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()
    assert len(out.logprobs) == 3


def test_n_samples_and_string_prompts(llm: LLM) -> None:
    outs = llm.generate(["All the world", "Friends, Romans"],
                        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=5, ignore_eos=True))
    assert len(outs) == 2 and all(len(o.outputs) == 2 for o in outs)
    assert outs[0].outputs[0].token_ids != outs[0].outputs[1].token_ids
    assert all(isinstance(c.text, str) for o in outs for c in o.outputs)
    assert outs[0].prompt == "All the world"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop_token_ids": "2"}, "stop_token_ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"n": 0}, "n"),
    ({"logprobs": -1}, "logprobs"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_and_engine_keeps_serving(llm: LLM) -> None:
    eng = llm.engine
    with pytest.raises(ValueError, match=r"prompt \(120 tokens\) \+ max_tokens \(16\) exceeds .* 128"):
        eng.add_request({"prompt_token_ids": [1] * 120}, SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request({"prompt_token_ids": [1, 10_000]}, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request({"prompt_token_ids": []}, SamplingParams())
    with pytest.raises(ValueError, match="list of integers"):
        eng.add_request({"prompt_token_ids": ["a"]}, SamplingParams())
    assert not eng.has_unfinished_requests()
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_abort_frees_blocks_and_others_finish(llm: LLM) -> None:
    eng = llm.engine
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    a = eng.add_request({"prompt_token_ids": list(range(1, 40))}, p)
    b = eng.add_request({"prompt_token_ids": list(range(2, 30))}, p)
    eng.step()
    eng.step()
    assert eng.kv_blocks_held_by_requests() > 0
    aborted = eng.abort_request(a)
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == [b] and len(done[0].outputs[0].token_ids) == 20
    assert eng.kv_blocks_held_by_requests() == 0 and eng.depth_rows_in_use() == 0
    assert eng.abort_request("no-such-request") is None


def test_bfloat16_serving_runs(tiny) -> None:
    llm = LLM(str(tiny[0]), dtype="bfloat16", max_model_len=64)
    out = llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    want = reference_greedy(tiny[1], [1, 2, 3, 4], 1)
    assert out[0].outputs[0].token_ids[0] == want[0]  # peaked logits: bf16 agrees on the first token
    assert len(out[0].outputs[0].token_ids) == 6



def _mk(tokens: list[int], prompt_len: int = 1, **kw) -> Request:
    r = Request("r", tokens[:prompt_len], SamplingParams(**kw), eos_token_ids=(2,))
    r.token_ids = list(tokens)
    return r


def test_sampler_penalties_and_min_tokens() -> None:
    s = Sampler()
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.9, -1.0]])
    # repetition penalty divides the positive logit of a seen token (2) below its rival (3)
    assert s(logits, [_mk([2, 2], temperature=0, repetition_penalty=2.0)]).token_ids == [3]
    # frequency penalty: token 2 was generated twice -> 3.0 - 2 * 0.1 < 2.9
    assert s(logits, [_mk([0, 2, 2], temperature=0, frequency_penalty=0.1)]).token_ids == [3]
    # presence penalty applies once however often the token appeared
    assert s(logits, [_mk([0, 2, 2], temperature=0, presence_penalty=0.05)]).token_ids == [2]
    # min_tokens bans EOS (id 2) until enough tokens are out
    assert s(logits, [_mk([0], temperature=0, min_tokens=1, max_tokens=5)]).token_ids == [3]
    assert s(logits, [_mk([0], temperature=0)]).token_ids == [2]


def test_greedy_and_random_rows_in_one_batch(llm: LLM, tiny) -> None:
    prompts = [[1, 33, 34, 35], [1, 36, 37]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    noisy = SamplingParams(temperature=1.5, max_tokens=6, ignore_eos=True, seed=3)
    alone = llm.generate({"prompt_token_ids": prompts[1]}, noisy)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy, noisy])
    assert outs[0].outputs[0].token_ids == reference_greedy(tiny[1], prompts[0], 6)
    assert outs[1].outputs[0].token_ids == alone
