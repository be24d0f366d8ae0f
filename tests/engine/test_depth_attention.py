"""Depth-attention introspection returns the weights the model used, equal to the naive reference mix."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from models.llama import LlamaForServing
from tests.tiny import reference_greedy, tiny_config, write_tiny

PROMPT = [1, 5, 6, 7, 8, 9, 10, 11, 12]
MAX_TOKENS = 5


@pytest.fixture(scope="module", params=[("block", 2, 5), ("block", 3, 5), ("full", 0, 3)],
                ids=["block2-L5", "block3-L5", "full-L3"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    return write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))


def _reference_weights(ref, ids: list[int]) -> list[list[list[float]]]:
    """Per position: per site, the naive mix's weights (models.reference)."""
    rec: list[torch.Tensor] = []
    with torch.no_grad():
        ref(torch.tensor([ids]), rec)
    return [[site[0, p].tolist() for site in rec] for p in range(len(ids))]


def _sites(cfg) -> list[int]:
    """Expected number of sources at each site, from the layer and block structure alone."""
    if cfg.attn_res_mode == "full":
        return [*range(1, 2 * cfg.num_hidden_layers + 1), 2 * cfg.num_hidden_layers + 1]
    out, n = [], 0  # n: completed blocks
    for i in range(cfg.num_hidden_layers):
        if i % cfg.attn_res_block_size == 0:  # sources: the n blocks and the partial that now closes
            out.append(n + 1 if i else 1)
            n += 1
        else:
            out.append(n + 1)
        out.append(n + 1)
    return [*out, n + 1]


def test_weights_match_reference_and_structure(model) -> None:
    folder, ref = model
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=4)  # chunked prefill
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, depth_attention=True))[0].outputs[0]
    assert out.token_ids == reference_greedy(ref, PROMPT, MAX_TOKENS)
    want = _reference_weights(ref, PROMPT + out.token_ids)
    assert len(out.depth_attention) == MAX_TOKENS
    for j, entry in enumerate(out.depth_attention):
        assert [len(site) for site in entry] == _sites(ref.cfg)
        for site, ref_site in zip(entry, want[len(PROMPT) - 1 + j], strict=True):
            assert sum(site) == pytest.approx(1.0, abs=1e-3)
            assert site == pytest.approx(ref_site, abs=2e-4)  # rounded to 4 decimals
    # The first site (layer 0 attention, Block) has a single source.
    if ref.cfg.attn_res_mode == "block":
        assert out.depth_attention[0][0] == [1.0]
    assert llm.engine.kv_blocks_held_by_requests() == 0


def test_prompt_positions_with_echo(model) -> None:
    folder, ref = model
    llm = LLM(str(folder), max_model_len=64)
    llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1))  # warm the prefix cache
    res = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=0, max_tokens=2, ignore_eos=True, depth_attention=True, prompt_depth_attention=True))[0]
    want = _reference_weights(ref, PROMPT)
    assert len(res.prompt_depth_attention) == len(PROMPT)  # no prefix-cache hit skipped any position
    for got, exp in zip(res.prompt_depth_attention, want, strict=True):
        for site, ref_site in zip(got, exp, strict=True):
            assert site == pytest.approx(ref_site, abs=2e-4)
    assert res.outputs[0].depth_attention[0] == res.prompt_depth_attention[-1]


def test_no_request_asking_means_no_recording(model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = model
    llm = LLM(str(folder), max_model_len=64)
    calls = {"n": 0}
    original = LlamaForServing.forward

    def spy(self, batch, depth_weights=None):  # type: ignore[no-untyped-def]
        out = original(self, batch, depth_weights)
        calls["n"] += 1
        assert batch.depth_rows is None and not depth_weights
        return out

    monkeypatch.setattr(LlamaForServing, "forward", spy)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert calls["n"] == 3 and out.depth_attention is None


def test_standard_model_rejects_depth_attention(tmp_path) -> None:
    folder, _ = write_tiny(tmp_path / "m", tiny_config("none", layers=1))
    llm = LLM(str(folder), max_model_len=32)
    with pytest.raises(ValueError, match="depth_attention needs an AttnRes model"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(depth_attention=True))
