"""Greedy tokens from the engine equal a naive full-recompute forward, under every scheduling path.

The reference (models.reference) is written straight from docs/attnres.md: no cache, no packing, no
two-phase schedule. Each case runs a batch of prompts of different lengths through the engine with
chunked prefill forced small, shared prefixes (prefix-cache hits) and a KV budget small enough to
force preemption.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.tiny import MAX_TOKENS, PROMPTS, expected_greedy, tiny_config, write_tiny

# (mode, block size, layers): a block size that does not divide the layers, one block, Full AttnRes.
CASES = [("none", 0, 4), ("block", 2, 5), ("block", 3, 5), ("block", 5, 5), ("block", 1, 3), ("full", 0, 4)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}{c[1] or ''}-L{c[2]}")
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    folder, _ = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))
    return folder, (mode, bs, layers)


@pytest.fixture(scope="module")
def expected(model) -> list[list[int]]:
    return [list(t) for t in expected_greedy(*model[1])]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _run(folder: Path, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), max_model_len=64, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs], llm


def _assert_idle(llm: LLM) -> None:
    eng = llm.engine
    assert eng.kv_blocks_held_by_requests() == 0
    assert eng.depth_rows_in_use() == 0
    assert not eng.has_unfinished_requests()


def test_batched(model, expected) -> None:
    got, llm = _run(model[0])
    assert got == expected
    _assert_idle(llm)


def test_chunked_prefill_and_prefix_hits(model, expected) -> None:
    got, llm = _run(model[0], max_num_batched_tokens=5, block_size=4)
    assert got == expected
    assert llm.engine.scheduler.stats.prefix_cache_hits > 0  # prompts 2 and 4 reuse blocks of prompt 1
    _assert_idle(llm)


def test_preemption_by_recompute(model, expected) -> None:
    # 16 blocks of 4 tokens hold one max-length request but not all four prompts' growth.
    got, llm = _run(model[0], block_size=4, num_kv_blocks=16, max_num_batched_tokens=16)
    assert got == expected
    assert llm.engine.scheduler.stats.num_preemptions > 0
    _assert_idle(llm)


def test_one_token_chunks_without_prefix_cache(model, expected) -> None:
    got, llm = _run(model[0], max_num_batched_tokens=3, block_size=2, enable_prefix_caching=False)
    assert got == expected
    assert llm.engine.scheduler.stats.prefix_cache_hits == 0
    _assert_idle(llm)
