"""The shipped built-in models load by name and generate real text through the engine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from models.loader import resolve_model
from models.reference import ReferenceLlama
from tests.tiny import reference_greedy


@pytest.mark.parametrize("name", ["shakespeare-attnres", "shakespeare-residual"])
def test_builtin_generates_like_reference(name: str) -> None:
    folder = resolve_model(name)
    llm = LLM(name, max_model_len=128, dtype="float32")  # the fp32 reference's precision
    assert llm.engine.model_config.is_attn_res == name.endswith("attnres")
    prompt = "HAMLET.\nTo be, or not to be,"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 12 and out.text.strip()
    ref = ReferenceLlama(llm.engine.model_config)
    ref.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    ids = llm.engine.tokenizer.encode(prompt)
    with torch.no_grad():
        assert out.token_ids == reference_greedy(ref.eval(), ids, 12)
