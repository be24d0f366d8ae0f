"""Nothing a request carries may stop the engine, poison the prefix cache, or make streams disagree.

Each test pins one defect found by an outside audit: a failed step that left its blocks published in
the prefix cache, one bad row failing the whole step (or the engine), extreme sampling values that
overflowed, stop strings that streamed part of themselves, and a detokenizer that held text forever.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import Sampler
from models.llama import LlamaForServing
from models.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tiny import reference_greedy, tiny_config, write_tiny

PROMPT = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # 18 tokens: 4 full blocks of 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    return write_tiny(tmp_path_factory.mktemp("harden"), tiny_config("block", 2), tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def llm(model) -> LLM:
    return LLM(str(model[0]), max_model_len=128, block_size=4, num_threads=1)


def _steps(eng: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Run the engine dry; per request id its DELTA outputs, and last a copy with them all merged."""
    seen: dict[str, list[RequestOutput]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.setdefault(out.request_id, []).append(out)
    for outs in seen.values():
        total = copy.deepcopy(outs[0])
        for out in outs[1:]:
            total.merge(copy.deepcopy(out))
        outs.append(total)
    return seen


def _idle(eng: LLMEngine) -> None:
    assert eng.kv_blocks_held_by_requests() == 0 and eng.depth_rows_in_use() == 0
    assert not eng.has_unfinished_requests()


def test_failed_step_does_not_poison_prefix_cache(llm: LLM, model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that dies after scheduling must leave none of its blocks findable by prefix hash."""
    eng, (_, ref) = llm.engine, model
    expected = reference_greedy(ref, PROMPT, 6)
    forward = LlamaForServing.forward

    def dies(self, *args):  # noqa: ANN001, ANN002 - the model's own signature
        raise RuntimeError("injected fault")

    monkeypatch.setattr(LlamaForServing, "forward", dies)
    eng.add_request({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outs = _steps(eng)
    (failed,) = outs.values()
    assert failed[-1].error and failed[-1].outputs[0].finish_reason == "error"
    _idle(eng)
    monkeypatch.setattr(LlamaForServing, "forward", forward)
    hits = eng.scheduler.stats.prefix_cache_hits
    again = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert eng.scheduler.stats.prefix_cache_hits == hits, "blocks of the failed step were served as prefix hits"
    assert again[0].outputs[0].token_ids == expected
    # once a step succeeded, its full blocks are shared as before
    third = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert eng.scheduler.stats.prefix_cache_hits == hits + 16
    assert third[0].outputs[0].token_ids == expected
    _idle(eng)


def test_a_row_that_cannot_be_built_fails_alone(llm: LLM, model, monkeypatch: pytest.MonkeyPatch) -> None:
    eng, (_, ref) = llm.engine, model
    block_ids = eng.kv.block_ids

    def broken(req_id: str) -> list[int]:
        if req_id == "bad":
            raise KeyError(req_id)
        return block_ids(req_id)

    monkeypatch.setattr(eng.kv, "block_ids", broken)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng.add_request({"prompt_token_ids": PROMPT}, params, "good")
    eng.add_request({"prompt_token_ids": [1, 30, 31]}, params, "bad")
    outs = _steps(eng)
    assert outs["bad"][-1].error and outs["bad"][-1].outputs[0].finish_reason == "error"
    assert outs["good"][-1].error is None
    assert outs["good"][-1].outputs[0].token_ids == reference_greedy(ref, PROMPT, 5)
    _idle(eng)


def test_a_row_that_cannot_be_sampled_fails_alone(llm: LLM, model, monkeypatch: pytest.MonkeyPatch) -> None:
    eng, (_, ref) = llm.engine, model
    call = Sampler.__call__

    def picky(self: Sampler, logits: torch.Tensor, reqs: list) -> object:
        if any(r.request_id == "bad" for r in reqs):
            raise OverflowError("injected sampling fault")
        return call(self, logits, reqs)

    monkeypatch.setattr(Sampler, "__call__", picky)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.add_request({"prompt_token_ids": PROMPT}, params, "good")
    eng.add_request({"prompt_token_ids": PROMPT[:5]}, params, "bad")
    outs = _steps(eng)
    assert outs["bad"][-1].outputs[0].finish_reason == "error"
    assert outs["good"][-1].outputs[0].token_ids == reference_greedy(ref, PROMPT, 4)
    _idle(eng)


@pytest.mark.parametrize("extreme", [
    {"temperature": 1e-300},
    {"temperature": 1e-300, "repetition_penalty": 1e-300},
    {"temperature": 1e-6, "top_k": 10**20},
    {"temperature": 0.5, "repetition_penalty": 1e-300, "seed": 2**64 - 1},
    {"temperature": 1e300, "top_p": 1e-300, "min_p": 1.0, "seed": -(2**63)},
])
def test_extreme_sampling_values_sample_valid_tokens(llm: LLM, model, extreme: dict) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=2, **extreme)
    out = llm.generate({"prompt_token_ids": PROMPT}, params)[0].outputs[0]
    vocab = llm.engine.model_config.vocab_size
    assert out.finish_reason == "length" and all(0 <= t < vocab for t in out.token_ids)
    assert all(lp.logprob == lp.logprob for lp in out.logprobs)  # no NaN
    if extreme.get("temperature", 1) < 1e-5 and "repetition_penalty" not in extreme:
        assert out.token_ids == reference_greedy(model[1], PROMPT, 4)  # a vanishing temperature is greedy
    _idle(llm.engine)


def test_huge_top_k_means_off(llm: LLM) -> None:
    def run(top_k: int) -> list[int]:
        p = SamplingParams(temperature=1.0, top_k=top_k, seed=7, max_tokens=8, ignore_eos=True)
        return llm.generate({"prompt_token_ids": PROMPT}, p)[0].outputs[0].token_ids

    assert run(10**20) == run(0)


def test_logit_bias_forces_and_bans_tokens(llm: LLM, model) -> None:
    greedy = reference_greedy(model[1], PROMPT, 3)
    banned = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logit_bias={greedy[0]: -100}))[0].outputs[0]
    assert banned.token_ids[0] != greedy[0]
    forced = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0.9, seed=1, max_tokens=5, ignore_eos=True, logit_bias={77: 100}))[0].outputs[0]
    assert forced.token_ids == [77] * 5
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(logit_bias={10**6: 1.0}))


def eng_final(llm: LLM, params: SamplingParams) -> CompletionOutput:
    """The same request answered in one piece (FINAL_ONLY, as a non-streaming client gets it)."""
    return llm.generate({"prompt_token_ids": PROMPT}, params)[0].outputs[0]


def _stream(llm: LLM, params: SamplingParams) -> tuple[str, str, object]:
    """(concatenated streamed deltas, final text, final output) for one request."""
    eng = llm.engine
    rid = eng.add_request({"prompt_token_ids": PROMPT}, params)
    outs = _steps(eng)[rid]
    final = eng_final(llm, params)
    return "".join(o.outputs[0].text for o in outs[:-1]), final.text, final


def test_stop_strings_spanning_tokens_never_stream_past_the_stop(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate({"prompt_token_ids": PROMPT}, free)[0].outputs[0].text
    assert len(full) > 20
    checked = 0
    for i in range(1, len(full) - 6, 3):
        for length in (2, 3, 5):
            stop = full[i:i + length]
            if not stop.strip():
                continue
            for include in (False, True):
                params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "@@@@@@@"],
                                        include_stop_str_in_output=include)
                streamed, final, comp = _stream(llm, params)
                assert streamed == final, (stop, include)
                cut = full.index(stop) + (len(stop) if include else 0)
                assert final == full[:cut] and comp.finish_reason == "stop" and comp.stop_reason == stop
                checked += 1
    assert checked > 20
    _idle(llm.engine)


def test_min_tokens_suppresses_stop_strings(llm: LLM) -> None:
    full = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = full.text[:2]
    assert stop.strip()
    early = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 12
    held = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=12))[0].outputs[0]
    assert held.token_ids == full.token_ids and held.finish_reason == "length"


def _byte_token(tok: Tokenizer, b: int) -> int:
    return next(i for i in range(tok.vocab_size) if tok.id_to_token(i) == f"<0x{b:02X}>")


def test_detokenizer_releases_invalid_bytes_and_stays_bounded(tokenizer_dir: Path) -> None:
    tok = Tokenizer(tokenizer_dir)
    detok = IncrementalDetokenizer(tok, [1, 5, 6])
    bad = _byte_token(tok, 0xFF)  # never valid in UTF-8
    text = "".join(detok.add([bad]) for _ in range(200))
    assert text.count("\ufffd") >= 190  # released as it goes, not held to the end
    assert len(detok.ids) <= IncrementalDetokenizer.CONTEXT_TOKENS + IncrementalDetokenizer.MAX_HELD_TOKENS + 1
    euro = [_byte_token(tok, b) for b in "€".encode()]  # a 3-byte character split over 3 tokens
    parts = [detok.add([t]) for t in euro]
    assert parts[:2] == ["", ""] and parts[2].endswith("€")


def test_text_released_at_the_end_goes_through_the_stop_check(llm: LLM) -> None:
    tok = llm.engine.tokenizer
    assert tok is not None
    lead = _byte_token(tok, "€".encode()[0])  # a lead byte: the text stays held back as incomplete
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, stop=["\ufffd"], logit_bias={lead: 100.0})
    streamed, final, comp = _stream(llm, params)
    assert comp.token_ids == [lead, lead]
    assert "\ufffd" not in final and comp.finish_reason == "stop" and streamed == final
