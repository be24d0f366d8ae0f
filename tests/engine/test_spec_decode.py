"""n-gram speculative decoding: greedy output identical to the reference and to the non-speculative engine
(std, Block and Full AttnRes), KV slots of rejected drafts given back, max_tokens and stops honoured inside
accepted drafts, and the sampling rule's output distribution equal to the target's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from engine.config import SpeculativeConfig
from engine.request import Request
from engine.sampler import Sampler
from engine.spec_decode import SpecBackoff, TokenMirror, propose_ngram
from kvcache.kv_manager import KVCacheManager
from tests.tiny import PROMPTS, random_model, reference_greedy, tiny_config, write_tiny

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# repetition, so the prompt itself offers drafts, plus the shared engine-vs-reference prompts
REPEAT = [[1, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [1, 30, 31, 30, 31, 30, 31, 30]]
MAX = 24


@pytest.fixture(scope="module", params=[("none", 0, 4), ("block", 2, 5), ("full", 0, 4)],
                ids=lambda c: c[0])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    folder, model = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))
    prompts = [*REPEAT, *PROMPTS]
    return folder, prompts, [reference_greedy(model, p, MAX) for p in prompts], mode


def _greedy(folder: Path, prompts: list[list[int]], params: SamplingParams | None = None, **kw
            ) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), max_model_len=64, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        params or SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], llm


def _assert_idle(llm: LLM) -> None:
    assert llm.engine.kv_blocks_held_by_requests() == 0
    assert llm.engine.depth_rows_in_use() == 0


@pytest.mark.parametrize("kw", [{}, {"block_size": 4, "max_num_batched_tokens": 7},
                                {"block_size": 2, "num_kv_blocks": 40, "max_num_batched_tokens": 16}],
                         ids=["batched", "small-budget", "preemption"])
def test_greedy_matches_reference_and_accepts(tiny, kw) -> None:
    folder, prompts, expected, mode = tiny
    got, llm = _greedy(folder, prompts, speculative_config=SPEC, **kw)
    assert got == expected
    st = llm.engine.scheduler.stats
    assert st.spec_num_drafts > 0
    if mode != "full":  # the random Full AttnRes model does not repeat itself: test_oracle_drafts accepts there
        assert st.spec_num_accepted_tokens > 0
    assert st.spec_num_accepted_tokens <= st.spec_num_draft_tokens
    assert sum(st.spec_accepted_per_pos) == st.spec_num_accepted_tokens
    assert st.generation_tokens == len(prompts) * MAX
    _assert_idle(llm)


@pytest.mark.parametrize("block_size,kernels", [(2, "auto"), (16, "auto"), (2, "reference")])
def test_oracle_drafts(tiny, monkeypatch: pytest.MonkeyPatch, block_size: int, kernels: str) -> None:
    """Drafts that are the true continuation, wrong from a position that varies by step (all accepted, some,
    none): every acceptance length and the bonus token, on every model, token for token the reference. The
    verified rows run as decode rows (each seeing its context up to itself) on both decode attention ops."""
    folder, prompts, expected, _ = tiny
    by_prompt = {tuple(p): e for p, e in zip(prompts, expected, strict=True)}

    def oracle(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
        for p, e in by_prompt.items():
            if tuple(token_ids[:len(p)]) == p:
                done = len(token_ids) - len(p)
                d = e[done:done + min(cfg.num_speculative_tokens, max_tokens)]
                wrong = len(token_ids) % (len(d) + 2)  # past the end: all right
                return [t if j != wrong else (t + 1) % 400 for j, t in enumerate(d)]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr("engine.scheduler.propose_ngram", oracle)
    monkeypatch.setattr("engine.spec_decode.SpecBackoff.should_draft", lambda self: True)
    got, llm = _greedy(folder, prompts, speculative_config=SPEC, block_size=block_size, kernels=kernels)
    assert got == expected
    st = llm.engine.scheduler.stats
    assert st.spec_num_accepted_tokens > 0 and st.spec_accepted_per_pos[-1] > 0
    assert st.spec_num_accepted_tokens < st.spec_num_draft_tokens
    _assert_idle(llm)


def test_prefix_cache_never_holds_rejected_tokens(tiny) -> None:
    """A second prompt extending the first's output reuses its published blocks: had a block been published
    with a rejected draft's KV or hash, the continuation would differ from the non-speculative one."""
    folder, prompts, expected, mode = tiny
    longer = [prompts[0] + expected[0][:20], prompts[1] + expected[1][:18]]
    ref, _ = _greedy(folder, longer, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm = LLM(str(folder), max_model_len=64, block_size=2, speculative_config=SPEC)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                 SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True))
    hits = llm.engine.scheduler.stats.prefix_cache_hits
    outs = llm.generate([{"prompt_token_ids": p} for p in longer],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert llm.engine.scheduler.stats.prefix_cache_hits > hits
    assert [o.outputs[0].token_ids for o in outs] == ref
    _assert_idle(llm)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 11])
def test_max_tokens_exact(tiny, max_tokens: int) -> None:
    folder, prompts, expected, mode = tiny
    got, llm = _greedy(folder, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       speculative_config=SPEC)
    assert got == [e[:max_tokens] for e in expected]
    _assert_idle(llm)


def test_stop_token_inside_accepted_drafts(tiny) -> None:
    folder, prompts, expected, mode = tiny
    # per prompt, a stop token emitted late in its output: with drafts it may arrive inside a verified run
    for i in range(len(prompts)):
        stop = expected[i][-4]
        params = SamplingParams(temperature=0, max_tokens=MAX, stop_token_ids=[stop], ignore_eos=True)
        got, llm = _greedy(folder, [prompts[i]], params, speculative_config=SPEC)
        assert got == [expected[i][:expected[i].index(stop) + 1]]
        _assert_idle(llm)


def test_logprobs_match_non_speculative(tiny) -> None:
    folder, prompts, _, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, logprobs=2)
    outs = [LLM(str(folder), max_model_len=64, **kw).generate([{"prompt_token_ids": p} for p in prompts], params)
            for kw in ({}, {"speculative_config": SPEC})]
    for a, b in zip(*outs, strict=True):
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(la) == len(lb) == MAX
        for x, y in zip(la, lb, strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("pen", [{"repetition_penalty": 1.3}, {"frequency_penalty": 0.7, "presence_penalty": 0.4},
                                 {"repetition_penalty": 0.8, "frequency_penalty": -0.5}])
def test_penalties_per_verification_row(tiny, monkeypatch: pytest.MonkeyPatch, pen: dict) -> None:
    """Penalties see the drafts before each row as output: greedy output and logprobs equal the non-speculative
    ones (oracle drafts, so penalised rows are accepted, rejected and corrected)."""
    folder, prompts, _, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, logprobs=1, **pen)
    llm = LLM(str(folder), max_model_len=64)
    ref = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    by_prompt = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, ref, strict=True)}

    def oracle(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
        for p, e in by_prompt.items():
            if tuple(token_ids[:len(p)]) == p:
                done = len(token_ids) - len(p)
                d = e[done:done + min(cfg.num_speculative_tokens, max_tokens)]
                wrong = len(token_ids) % (len(d) + 2)
                return [t if j != wrong else (t + 1) % 400 for j, t in enumerate(d)]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr("engine.scheduler.propose_ngram", oracle)
    monkeypatch.setattr("engine.spec_decode.SpecBackoff.should_draft", lambda self: True)
    spec = LLM(str(folder), max_model_len=64, speculative_config=SPEC)
    got = spec.generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(ref, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert [x.logprob for x in b.outputs[0].logprobs] == pytest.approx([x.logprob for x in a.outputs[0].logprobs],
                                                                          abs=1e-4)
    st = spec.engine.scheduler.stats
    assert st.spec_num_accepted_tokens > 0 and st.spec_num_accepted_tokens < st.spec_num_draft_tokens


def test_sampled_runs_and_seeded_is_reproducible(tiny) -> None:
    folder, prompts, _, _ = tiny
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=MAX, ignore_eos=True, seed=7)
    a, _ = _greedy(folder, prompts, params, speculative_config=SPEC)
    b, llm = _greedy(folder, prompts, params, speculative_config=SPEC)
    assert a == b and all(len(t) == MAX for t in a)
    _assert_idle(llm)


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_rejection_rule_keeps_the_distribution(kw) -> None:
    """The first emitted token of a verified step is distributed as the target's (temperature, top-k/top-p)
    distribution, whatever the draft: many draws with a fixed seed, total variation within sampling noise."""
    torch.manual_seed(0)
    vocab, n = 8, 5000
    logits = torch.randn(3, vocab) * 1.5  # [1 + 2 drafts, V]
    sampler = Sampler(seed=123)
    req = Request("r", [1, 2], SamplingParams(max_tokens=5, **kw))
    ref = Sampler(seed=0)
    target = ref._weights(logits[:1] / kw["temperature"], [req])[0].double()
    target /= target.sum()
    for draft in (int(target.argmax()), int(target.argmin())):
        counts = torch.zeros(vocab, dtype=torch.float64)
        for _ in range(n):
            counts[sampler.verify(logits, req, [draft, 4])[0][0]] += 1
        tv = 0.5 * float((counts / n - target).abs().sum())
        assert tv < 0.04, (draft, tv)  # sampling noise ~0.015; always accepting the argmax draft: > 0.3


def test_first_token_distribution_on_a_tiny_model() -> None:
    """On a tiny model's own logits (temperature 1.5, top-k 8), the first token a verified step emits is
    distributed as non-speculative sampling's: both empirical histograms, fixed seeds, against each other and
    against the exact distribution."""
    model = random_model(tiny_config("block", 2, layers=5))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7, 8, 9, 5, 6, 7]]))[0, -3:].float()  # [1 + 2 drafts, V]
    req = Request("r", [1], SamplingParams(temperature=1.5, top_k=8, max_tokens=5))
    n, vocab = 4000, logits.shape[1]
    plain = Sampler(seed=6)(logits[:1].expand(n, -1).contiguous(), [req] * n).token_ids
    plain_p = torch.bincount(torch.tensor(plain), minlength=vocab).double() / n
    exact = Sampler._weights(logits[:1] / 1.5, [req])[0].double()
    exact /= exact.sum()
    spec = Sampler(seed=5)
    for draft in (int(logits[0].argmax()), int(exact.argsort()[-8])):  # the likeliest, the least likely kept
        got = torch.zeros(vocab, dtype=torch.float64)
        for _ in range(n):
            got[spec.verify(logits, req, [draft, 7])[0][0]] += 1
        got /= n
        assert 0.5 * float((got - plain_p).abs().sum()) < 0.05
        assert 0.5 * float((got - exact).abs().sum()) < 0.04


def test_greedy_verify_rule() -> None:
    logits = torch.full((4, 6), -5.0)
    logits[0, 2] = logits[1, 3] = logits[2, 1] = logits[3, 0] = 5.0  # argmax 2, 3, 1, 0
    req = Request("r", [1], SamplingParams(temperature=0, max_tokens=9))
    s = Sampler()
    assert [t for t, _ in s.verify(logits, req, [2, 3, 1])] == [2, 3, 1, 0]  # all accepted + bonus
    assert [t for t, _ in s.verify(logits, req, [2, 4, 1])] == [2, 3]  # rejected at 1: the correction
    assert [t for t, _ in s.verify(logits, req, [5, 3, 1])] == [2]


def test_propose_ngram() -> None:
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=3)
    assert propose_ngram([1, 2, 3, 4, 5, 9, 1, 2, 3], cfg, 10) == [4, 5, 9]
    assert propose_ngram([1, 2, 3, 4, 5, 9, 1, 2, 3], cfg, 2) == [4, 5]
    assert propose_ngram([8, 2, 3, 4, 7, 2, 3, 5, 1, 2, 3], cfg, 10) == [5, 1, 2]  # the latest occurrence
    assert propose_ngram([1, 2, 3, 4, 5], cfg, 10) == []
    assert propose_ngram([4, 5, 6, 4, 5, 6], cfg, 0) == []


def test_propose_ngram_equals_brute_force() -> None:
    """The vectorised search picks what the plain definition does: the latest earlier occurrence of the longest
    suffix n-gram (max..min) with a token after it."""
    import random

    def brute(tok: list[int], c: SpeculativeConfig, mx: int) -> list[int]:
        k = min(c.num_speculative_tokens, mx)
        for n in range(min(c.prompt_lookup_max, len(tok) - 1), c.prompt_lookup_min - 1, -1):
            for i in range(len(tok) - 1 - n, -1, -1):
                if tok[i:i + n] == tok[-n:]:
                    return tok[i + n:i + n + k] if k > 0 else []
        return []

    rng = random.Random(1)
    mirror = TokenMirror()
    grown: list[int] = []
    for _ in range(1500):
        t = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 40))]
        c = SpeculativeConfig(num_speculative_tokens=rng.randrange(1, 5), prompt_lookup_min=rng.randrange(1, 3),
                              prompt_lookup_max=rng.randrange(3, 6))
        mx = rng.randrange(0, 6)
        assert propose_ngram(t, c, mx) == brute(t, c, mx), (t, c, mx)
        grown += t[:3]
        assert propose_ngram(mirror.sync(grown), c, mx) == brute(grown[-4096:], c, mx)


def test_backoff() -> None:
    b = SpecBackoff()
    assert b.should_draft()
    b.record(0)
    b.record(0)  # two misses: skip the next 4 steps
    assert [b.should_draft() for _ in range(5)] == [False] * 4 + [True]
    b.record(2)
    assert b.should_draft()


def test_draft_length_follows_acceptance() -> None:
    b = SpecBackoff()
    assert b.draft_len(4) == 4  # nothing verified yet: the full k
    b.record(0, 4)
    assert b.draft_len(4) == 1  # nothing accepted: one token
    lengths = []
    for _ in range(4):  # all accepted each time: twice as many, up to k
        n = b.draft_len(4)
        lengths.append(n)
        b.record(n, n)
    assert lengths == [1, 2, 4, 4] and b.draft_len(4) == 4
    b.record(2, 4)  # partly accepted: unchanged
    assert b.draft_len(4) == 4 and b.draft_len(2) == 2


def test_kv_trim_gives_back_unused_tail_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", list(range(10)), 0, 10)  # 3 blocks
    free = kv.pool.num_free
    kv.trim("a", 5)  # tokens 0..4 need 2 blocks
    assert len(kv.block_ids("a")) == 2 and kv.pool.num_free == free + 1
    kv.trim("a", 8)
    assert len(kv.block_ids("a")) == 2


def test_config_validation() -> None:
    assert EngineArgs().create_engine_config().speculative is None
    cfg = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 5}').create_engine_config()
    assert cfg.speculative == SpeculativeConfig(num_speculative_tokens=5)
    for bad, field in [({"method": "eagle"}, "method"), ({"method": "ngram", "num_speculative_tokens": 0},
                                                         "num_speculative_tokens"),
                       ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "lookahead": 2}, "lookahead"), ("{not json", "JSON"),
                       ({"num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "disable_by_batch_size": 0}, "disable_by_batch_size")]:
        with pytest.raises(ValueError, match=field):
            EngineArgs(speculative_config=bad).create_engine_config()


def test_disable_by_batch_size(tiny) -> None:
    """No drafts while as many requests as disable_by_batch_size run; drafts again once fewer do. Output unchanged."""
    folder, prompts, expected, _ = tiny
    got, llm = _greedy(folder, prompts, speculative_config={**SPEC, "disable_by_batch_size": len(prompts) + 1})
    assert got == expected and llm.engine.scheduler.stats.spec_num_drafts > 0
    got, llm = _greedy(folder, prompts, speculative_config={**SPEC, "disable_by_batch_size": 1})
    assert got == expected and llm.engine.scheduler.stats.spec_num_drafts == 0
    # two requests: drafting is off while both run, on once the shorter one is done
    two = prompts[:2]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True)]
    llm = LLM(str(folder), max_model_len=64, speculative_config={**SPEC, "disable_by_batch_size": 2})
    outs = llm.generate([{"prompt_token_ids": p} for p in two], params)
    assert [o.outputs[0].token_ids for o in outs] == [expected[0][:4], expected[1]]
    assert llm.engine.scheduler.stats.spec_num_drafts > 0
    _assert_idle(llm)


@pytest.fixture(scope="module")
def with_tokenizer(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = write_tiny(tmp_path_factory.mktemp("t"), tiny_config("block", 2, layers=3),
                           tokenizer_from=tokenizer_dir)
    return folder


def test_stop_strings_inside_accepted_drafts(with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop string completed by an accepted draft ends the sample at that token, text and tokens exactly as
    without drafts (oracle drafts, so several tokens arrive in one step)."""
    prompts = [[1, *range(40, 52)], [1, 60, 61, 62, 60, 61, 62, 60]]
    plain = LLM(str(with_tokenizer), max_model_len=64)
    ref = plain.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    by_prompt = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, ref, strict=True)}

    def oracle(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
        for p, e in by_prompt.items():
            if tuple(token_ids[:len(p)]) == p:
                done = len(token_ids) - len(p)
                return list(e[done:done + min(cfg.num_speculative_tokens, max_tokens)])
        raise AssertionError("unknown prompt")

    monkeypatch.setattr("engine.scheduler.propose_ngram", oracle)
    spec = LLM(str(with_tokenizer), max_model_len=64, speculative_config=SPEC)
    for o in ref:
        text = o.outputs[0].text
        assert len(text) > 12
        for stop, include in ((text[8:11], False), (text[5:7], True)):
            params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                    include_stop_str_in_output=include, logprobs=1)
            want, got = (llm.generate([{"prompt_token_ids": o.prompt_token_ids}], params)[0].outputs[0]
                         for llm in (plain, spec))
            assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
                (want.text, want.token_ids, want.finish_reason, want.stop_reason)
            assert len(got.logprobs) == len(got.token_ids)
        stop_id = o.outputs[0].token_ids[12]  # a stop token id (or EOS) inside accepted drafts: text up to it
        for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]),
                       SamplingParams(temperature=0, max_tokens=30, stop=["zzz"], stop_token_ids=[stop_id])):
            want, got = (llm.generate([{"prompt_token_ids": o.prompt_token_ids}], params)[0].outputs[0]
                         for llm in (plain, spec))
            assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
                (want.text, want.token_ids, want.finish_reason, want.stop_reason)
            assert got.text
    assert spec.engine.scheduler.stats.spec_num_accepted_tokens > 0
    assert spec.engine.kv_blocks_held_by_requests() == 0


def test_metrics_exported_with_vllm_names(tiny) -> None:
    from server.metrics import _EngineStatsCollector

    folder, prompts, _, _ = tiny
    llm = LLM(str(folder), max_model_len=64, speculative_config=SPEC)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                 SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True))
    s = llm.engine.stats()
    assert s.spec_decode_num_drafts > 0 and len(s.spec_decode_num_accepted_tokens_per_pos) == 3
    samples = {(m.name, smp.labels.get("position")): smp.value
               for m in _EngineStatsCollector._collect_one("tiny", s) for smp in m.samples}
    assert samples[("depthserve:spec_decode_num_drafts", None)] == s.spec_decode_num_drafts
    assert samples[("depthserve:spec_decode_num_draft_tokens", None)] == s.spec_decode_num_draft_tokens
    assert samples[("depthserve:spec_decode_num_accepted_tokens", None)] == s.spec_decode_num_accepted_tokens
    assert [samples[("depthserve:spec_decode_num_accepted_tokens_per_pos", str(i))] for i in range(3)] == \
        list(s.spec_decode_num_accepted_tokens_per_pos)


@pytest.mark.slow
def test_tp2_verifies_drafts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification rows go through the tensor-parallel forward like prompt chunks: TP=2 with drafts (all
    accepted, some, none) gives the reference's tokens."""
    folder, model = write_tiny(tmp_path / "m", tiny_config("block", 2, layers=3))
    prompts = [*REPEAT, *PROMPTS[:2]]
    expected = {tuple(p): reference_greedy(model, p, 12) for p in prompts}

    def oracle(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
        for p, e in expected.items():
            if tuple(token_ids[:len(p)]) == p:
                done = len(token_ids) - len(p)
                d = e[done:done + min(cfg.num_speculative_tokens, max_tokens)]
                wrong = len(token_ids) % (len(d) + 2)
                return [t if j != wrong else (t + 1) % 400 for j, t in enumerate(d)]
        raise AssertionError("unknown prompt")

    monkeypatch.setattr("engine.scheduler.propose_ngram", oracle)
    monkeypatch.setattr("engine.spec_decode.SpecBackoff.should_draft", lambda self: True)
    with LLM(str(folder), tensor_parallel_size=2, max_model_len=64, num_threads=1,
             speculative_config=SPEC) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert llm.engine.scheduler.stats.spec_num_accepted_tokens > 0
        assert llm.engine.kv_blocks_held_by_requests() == 0
    assert [o.outputs[0].token_ids for o in outs] == [expected[tuple(p)] for p in prompts]


def test_grammar_rows_beside_drafting_rows(with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured-output request does not draft; in a batch with drafting requests its grammar mask still
    lands on its own row (the masks of the plainly sampled rows are picked out of the step's)."""
    import json

    prompts = [[1, *range(40, 52)], [1, 60, 61, 62, 60, 61, 62, 60]]
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = LLM(str(with_tokenizer), max_model_len=128)
    want = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], free)]
    by_prompt = {tuple(p): w for p, w in zip(prompts, want, strict=True)}

    def oracle(token_ids: list[int], cfg: SpeculativeConfig, max_tokens: int) -> list[int]:
        for p, e in by_prompt.items():
            if tuple(token_ids[:len(p)]) == p:
                done = len(token_ids) - len(p)
                return list(e[done:done + min(cfg.num_speculative_tokens, max_tokens)])
        raise AssertionError("a grammar request drafted")

    monkeypatch.setattr("engine.scheduler.propose_ngram", oracle)
    spec = LLM(str(with_tokenizer), max_model_len=128, speculative_config=SPEC)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    constrained = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": schema})
    outs = spec.generate([{"prompt_token_ids": p} for p in [*prompts, [1, 70, 71]]], [free, free, constrained])
    assert [o.outputs[0].token_ids for o in outs[:2]] == want
    doc = json.loads(outs[2].outputs[0].text)
    assert set(doc) == {"n"} and 0 <= doc["n"] <= 99
    assert spec.engine.scheduler.stats.spec_num_accepted_tokens > 0


def test_depth_records_turn_drafting_off(tiny) -> None:
    """depth_attention entries (per request, or every token's for --depth-metrics) come from one row a
    request: those requests decode without drafts, with every entry present."""
    folder, prompts, expected, mode = tiny
    if mode == "none":
        pytest.skip("depth weights exist only in AttnRes models")
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, depth_attention=True)
    got, llm = _greedy(folder, prompts[:2], params, speculative_config=SPEC)
    assert got == expected[:2] and llm.engine.scheduler.stats.spec_num_drafts == 0
    llm = LLM(str(folder), max_model_len=64, speculative_config=SPEC, depth_stats=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                        SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected[:2]
    assert llm.engine.scheduler.stats.spec_num_drafts == 0
