"""Per-step output work stays O(new tokens): a 4,000-token request costs the same per step at the end as at
the start (outputs are deltas, text is searched for stop strings only where it is new).

Measured in bytes of what each step hands out and in the output processor's held state, not in time.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.outputs import RequestOutputKind
from tests.tiny import tiny_config, write_tiny

TOKENS = 4000


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> LLM:
    folder, _ = write_tiny(tmp_path_factory.mktemp("long"), tiny_config("block", 2, max_pos=TOKENS + 64),
                           tokenizer_from=tokenizer_dir)
    return LLM(str(folder), max_model_len=TOKENS + 64, num_threads=1, kv_cache_memory="64MiB")


@pytest.mark.slow
def test_per_step_output_work_does_not_grow(llm: LLM) -> None:
    eng = llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=TOKENS, ignore_eos=True, logprobs=3,
                            depth_attention=True, stop=["never appears in this text @@"])
    rid = eng.add_request({"prompt_token_ids": [1, 5, 6, 7]}, params)
    sizes: list[int] = []  # bytes handed out per step
    held: list[int] = []  # characters the output processor holds for the request between steps
    tokens = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        assert [o.request_id for o in outs] == [rid]
        comp = outs[0].outputs[0]
        tokens += len(comp.token_ids)
        sizes.append(len(pickle.dumps(outs)))
        if not outs[0].finished:
            state = eng.processor.samples[rid]
            held.append(len(state.text.pending) + len(state.text.recent) + len(state.detokenizer.ids))
    assert tokens == TOKENS and len(sizes) == TOKENS
    early, late = max(sizes[10:500]), max(sizes[-500:-1])
    assert late <= early * 1.5, (early, late)  # quadratic copies would make the late steps ~100x larger
    assert max(held) < 200


def test_final_only_hands_out_nothing_until_the_end(llm: LLM) -> None:
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, logprobs=1, depth_attention=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    eng.add_request({"prompt_token_ids": [1, 5, 6, 7]}, params, "final")
    steps = []
    while eng.has_unfinished_requests():
        steps.append(eng.step())
    assert all(not s for s in steps[:-1]) and len(steps[-1]) == 1
    comp = steps[-1][0].outputs[0]
    assert len(comp.token_ids) == len(comp.logprobs) == len(comp.depth_attention) == 50
