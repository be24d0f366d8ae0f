"""The fused decode layer (kernels/csrc/decode_layer.cpp, KernelSet.decode_layer) against the per-op path.

The op alone against kernels/reference.py's decode_layer (fp32 tight, bf16 within rounding), its refusal of
tensors it does not take (nothing written, the wrapper answers None); then engines on the native ops, where
every pure-decode step runs the model twice, per-op then fused, and the two must give the same hidden states:
standard and Block AttnRes (a block size that does not divide the layer count), batch 1 and 3 rows of
different context lengths, d 72 and head_dim 24 (no multiple of the 8-wide vectors but 24), fp32 and bf16.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from kernels import cpu_ext, ops, reference
from models.config import ModelConfig
from models.llama import ENV_FUSED_DECODE
from tests.tiny import write_tiny

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module")
def ds():
    if cpu_ext.load() is None:
        pytest.skip("the native CPU ops did not build here")
    return torch.ops.depthserve


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("glue", ["standard", "site"])
def test_op_equals_reference(ds, dtype, glue) -> None:
    got = ops._probe_decode_layer(ds.decode_layer.default, dtype, glue)
    want = ops._probe_decode_layer(reference.decode_layer, dtype, glue)
    tol = 1e-5 if dtype == F32 else 3e-2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


def test_refuses_without_writing(ds) -> None:
    """A slot outside the cache: the op raises before it writes, the kernel set's wrapper answers None."""
    seen: list[list[torch.Tensor]] = []

    def bad_slot(*args):  # the probe's call with slot_mapping pointing past the cache
        args = list(args)
        args[6] = torch.tensor([0, 1, 1000])
        seen.append([t.clone() for t in (args[4], args[5], args[13])])  # k_cache, v_cache, residual before
        with pytest.raises(RuntimeError, match="outside the caches"):
            ds.decode_layer.default(*args)
        assert ops._native_ops().decode_layer(*args) is None
        for before, after in zip(seen[0], (args[4], args[5], args[13]), strict=True):
            assert torch.equal(before, after)
        return torch.zeros(())

    ops._probe_decode_layer(bad_slot, F32, "standard")
    assert seen


def _config(mode: str) -> ModelConfig:
    return ModelConfig(vocab_size=400, hidden_size=72, intermediate_size=100, num_hidden_layers=5,
                       num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256, rope_theta=10000.0,
                       tie_word_embeddings=False, attn_res_mode=mode,  # type: ignore[arg-type]
                       attn_res_block_size=2 if mode == "block" else 0)


@pytest.fixture(scope="module", params=["none", "block"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = write_tiny(tmp_path_factory.mktemp(request.param), _config(request.param))
    return path


PROMPTS = {1: [[1, 5, 6, 7, 8, 9, 10, 11]],
           3: [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [1, 20, 30],
               [1, 7, 8, 9, 10, 11, 40, 41, 42]]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("path", ["step", "layer"])
def test_engine_fused_equals_per_op(ds, folder, dtype, rows, path) -> None:
    """path "step": every layer in one call (decode_layers); "layer": decode_layers refuses (None), so each
    layer runs as one call (decode_layer), the fallback."""
    assert os.environ.get(ENV_FUSED_DECODE, "1") != "0"
    llm = LLM(str(folder), dtype=dtype, max_model_len=128, block_size=4, kernels="native")
    model = llm.engine.model
    assert model.k.fused_decode and model.fused_layers is not None
    calls: list[bool] = []
    name = "decode_layers" if path == "step" else "decode_layer"
    fused_op = getattr(model.k, name)

    def counted(*args, **kw):
        out = fused_op(*args, **kw)
        calls.append(out is not None)
        return out

    model.k = dataclasses.replace(model.k, **{name: counted})
    if path == "layer":
        model.k = dataclasses.replace(model.k, decode_layers=lambda *args, **kw: None)
    forward, layers = model.forward, model.fused_layers
    compared: list[int] = []

    def both(batch, depth_weights=None):
        if not model._fused_decode(batch):
            return forward(batch, depth_weights)
        model.fused_layers = None  # the per-op path first: it writes the same K/V and depth pool rows
        try:
            want = forward(batch, depth_weights).clone()
        finally:
            model.fused_layers = layers
        got = forward(batch, depth_weights)
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same kernels, the same roundings
        compared.append(batch.input_ids.shape[0])
        return got

    model.forward = both
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[rows]], params)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert len(compared) >= 7 and max(compared) == rows
    assert calls and all(calls)  # every fused call ran (none fell back)
    assert len(calls) == len(compared) * (1 if path == "step" else len(model.layers))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("block", [False, True], ids=["standard", "block"])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_layers_equals_reference(ds, dtype, block, rows) -> None:
    """The whole-step op against reference.decode_layers (3 layers; blocks of 2): fp32 tight, bf16 within
    rounding (the reference's bf16 linears round differently from the fp32-accumulating kernel)."""
    got_args, got_kw = ops.decode_layers_case(dtype, block, rows)
    want_args, want_kw = ops.decode_layers_case(dtype, block, rows)
    got = ops._native_ops().decode_layers(*got_args, **got_kw)
    want = reference.decode_layers(*want_args, **want_kw)
    assert got is not None
    tol = 1e-5 if dtype == F32 else 6e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for g, w in zip([got_args[0], *got_args[3], *got_args[4]], [want_args[0], *want_args[3], *want_args[4]],
                    strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)  # h, the caches
    if block:
        for key in ("states", "keys", "lse", "xo"):
            torch.testing.assert_close(got_kw[key], want_kw[key], rtol=tol, atol=tol)
