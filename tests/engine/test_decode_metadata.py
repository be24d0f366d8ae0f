"""The decode gather view (decode_gather, decode_mask) is built only where a decode attention reads it: up front
for the reference op, never by the runner for the native op (which reads the block table), and lazily, once
per step, when the native op hands a call to the reference. Each way serves the reference tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_attention, ops, reference
from models.context import AttentionMetadata, ForwardBatch
from models.llama import ENV_FUSED_DECODE
from tests.tiny import PROMPTS, expected_greedy, tiny_config, write_tiny

CASE = ("block", 2, 3)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    folder, _ = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(CASE[0], CASE[1], layers=CASE[2]))
    return folder, [list(t[:GREEDY.max_tokens]) for t in expected_greedy(*CASE)]


def _native_decode_available() -> bool:
    return ops.kernel_set(ops.Backend("native", "native")).decode_attention is cpu_attention.native_decode_attention


class DecodeSteps:
    """Wraps the runner's model forward: per step with decode rows, whether the gather view was there when the
    forward began, and whether it was there after it."""

    def __init__(self, llm: LLM) -> None:
        self.before: list[bool] = []
        self.after: list[bool] = []
        model = llm.engine.runner.model
        forward = model.forward

        def spy(batch: ForwardBatch, *args: object, **kw: object) -> torch.Tensor:
            meta = batch.attn
            if meta.num_decode:
                self.before.append(meta.decode_gather is not None)
            out = forward(batch, *args, **kw)
            if meta.num_decode:
                self.after.append(meta.decode_gather is not None and meta.decode_mask is not None)
            return out

        model.forward = spy  # type: ignore[method-assign]


def _run(folder: Path, kernels: str, padded: list[int] | None = None) -> tuple[list[list[int]], DecodeSteps, LLM]:
    llm = LLM(str(folder), max_model_len=64, kernels=kernels, block_size=4, max_num_batched_tokens=16)
    if padded:
        llm.engine.runner.use_padded_decode(padded)
    spy = DecodeSteps(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs], spy, llm


def test_reference_kernels_get_the_gather_view_up_front(model) -> None:
    folder, expected = model
    got, spy, llm = _run(folder, "reference")
    assert llm.engine.runner.model.k.needs_decode_gather
    assert got == expected
    assert spy.before and all(spy.before)


@pytest.mark.parametrize("padded", [None, [8]], ids=["packed", "padded"])
def test_native_decode_attention_gets_no_gather_view(model, padded) -> None:
    if not _native_decode_available():
        pytest.skip("the native decode attention is unavailable here")
    folder, expected = model
    got, spy, llm = _run(folder, "native", padded)
    k = llm.engine.runner.model.k
    assert k.decode_attention is cpu_attention.native_decode_attention and not k.needs_decode_gather
    assert got == expected
    assert spy.before and not any(spy.before) and not any(spy.after)  # nothing built, nothing asked for one
    if padded:
        assert llm.engine.runner.padded_steps > 0


def test_a_native_call_that_falls_back_builds_the_view_lazily(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the native op cannot take a call (here: the op is gone; in practice fp16 tensors) the reference
    runs on a view built from the block table, once per step, and the tokens are still the reference's."""
    if not _native_decode_available():
        pytest.skip("the native decode attention is unavailable here")
    folder, expected = model
    builds = []
    view = AttentionMetadata.decode_gather_view

    def counted(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        builds.append(meta.decode_gather is None)
        return view(meta)

    monkeypatch.setattr(AttentionMetadata, "decode_gather_view", counted)
    monkeypatch.setattr(cpu_attention, "_op", None)  # the wrapper's cached op, then its loader
    monkeypatch.setattr(cpu_attention, "op", lambda: None)
    monkeypatch.setenv(ENV_FUSED_DECODE, "0")  # the per-op path (the fused decode layer calls the C++ kernel)
    got, spy, _ = _run(folder, "native")
    assert got == expected
    assert spy.before and not any(spy.before) and all(spy.after)  # built during the step, by the fallback
    assert builds.count(True) == len(spy.before)  # once per step; the other layers reuse it
    assert len(builds) == CASE[2] * len(spy.before)


def test_the_lazy_view_equals_the_runners(model) -> None:
    """decode_gather_view from the block table gives the slots and mask the runner builds for the reference."""
    folder, _ = model
    llm = LLM(str(folder), max_model_len=64, kernels="reference", block_size=4)
    seen = []
    forward = llm.engine.runner.model.forward

    def spy(batch: ForwardBatch, *args: object, **kw: object) -> torch.Tensor:
        meta = batch.attn
        if meta.num_decode:
            lazy = AttentionMetadata(slot_mapping=meta.slot_mapping, num_decode=meta.num_decode,
                                     block_size=meta.block_size, decode_block_table=meta.decode_block_table,
                                     decode_context_lens=meta.decode_context_lens)
            gather, mask = lazy.decode_gather_view()
            seen.append(torch.equal(gather, meta.decode_gather) and torch.equal(mask, meta.decode_mask))
        return forward(batch, *args, **kw)

    llm.engine.runner.model.forward = spy  # type: ignore[method-assign]
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert seen and all(seen)
    assert reference.decode_attention is llm.engine.runner.model.k.decode_attention
