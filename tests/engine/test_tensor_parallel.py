"""TP=2 over gloo gives the same greedy tokens as TP=1; a dead worker fails the engine fast, leaving no orphans."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import LLM, SamplingParams
from engine.parallel import WorkerDiedError
from tests.tiny import reference_greedy, tiny_config, write_tiny

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 30], [1, 5, 6, 7, 8, 9, 40, 41, 42, 43]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "bs", "kv_heads"), [("none", 0, 2), ("block", 2, 2), ("block", 2, 1)],
                         ids=["standard", "block-kv-sharded", "block-kv-replicated"])
def test_tp2_equals_tp1_and_reference(tmp_path, mode: str, bs: int, kv_heads: int) -> None:
    cfg = tiny_config(mode, bs, layers=3, kv_heads=kv_heads)
    folder, ref = write_tiny(tmp_path / "m", cfg)
    want = [reference_greedy(ref, p, 8) for p in PROMPTS]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    tp1 = [o.outputs[0].token_ids for o in LLM(str(folder), max_model_len=64).generate(prompts, GREEDY)]
    with LLM(str(folder), tensor_parallel_size=2, max_model_len=64, num_threads=1,
             max_num_batched_tokens=6) as llm:
        tp2 = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert llm.engine.kv_blocks_held_by_requests() == 0
    assert tp2 == tp1 == want


def test_killed_worker_fails_fast_without_orphans(tmp_path) -> None:
    folder, _ = write_tiny(tmp_path / "m", tiny_config("block", 2, layers=2))
    llm = LLM(str(folder), tensor_parallel_size=2, max_model_len=64, num_threads=1)
    eng = llm.engine
    assert eng.tp_group is not None
    worker = eng.tp_group.procs[0]
    os.kill(worker.pid, signal.SIGKILL)
    eng.add_request({"prompt_token_ids": [1, 2, 3]}, GREEDY)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="worker"):
        for _ in range(100):
            eng.step()
            time.sleep(0.05)
    assert time.monotonic() - t0 < 10
    llm.shutdown()
    assert not any(p.is_alive() for p in eng.tp_group.procs)


def test_tp_rejects_indivisible_shapes(tmp_path) -> None:
    folder, _ = write_tiny(tmp_path / "m", tiny_config("none", layers=1))
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        LLM(str(folder), tensor_parallel_size=3, max_model_len=64)


@pytest.mark.slow
def test_tp2_prompt_logprobs_over_several_logits_pieces(tmp_path) -> None:
    """A 600-row prompt chunk is scored in two logits pieces, each an all-gather every rank must make."""
    import torch

    from models.llama import LOGITS_PIECE_ROWS

    folder, ref = write_tiny(tmp_path / "m", tiny_config("block", 2, layers=2, max_pos=1024))
    prompt = torch.randint(3, 400, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    assert len(prompt) > LOGITS_PIECE_ROWS
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    with LLM(str(folder), tensor_parallel_size=2, max_model_len=1024, num_threads=1,
             max_num_batched_tokens=1024) as llm:
        out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([prompt]))[0].float(), dim=-1)  # [T, V]
    got = [lp.logprob for lp in out.prompt_logprobs[1:]]
    assert got == pytest.approx(want[torch.arange(599), torch.tensor(prompt[1:])].tolist(), abs=1e-4)
    assert out.outputs[0].token_ids == reference_greedy(ref, prompt, 2)
