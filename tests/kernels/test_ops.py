"""kernels: every native op equals its reference; the engine serves the same greedy tokens on either
backend; a native op that fails at start-up means the reference, one warning, and a correct engine."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import LLM, SamplingParams
from engine.arg_utils import EngineArgs
from kernels import cpu, ops, reference
from models.layers import PackedWeight
from tests.tiny import reference_greedy, tiny_config, write_tiny

# (out, in): not multiples of 16, a single output, the tiny model's and a wide one.
SHAPES = [(37, 53), (1, 17), (100, 75), (96, 64), (3072, 576)]


def _native_or_skip(dtype: torch.dtype) -> ops.Backend:
    backend = ops.select_backend("native", (dtype,))
    if not backend.native:
        pytest.skip(f"native kernels unavailable here for {dtype}: {backend.reason}")
    return backend


def _case(out_f: int, in_f: int, m: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(out_f * 1000 + in_f + m)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    x = torch.randn(m, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_fp32_matches_reference(shape, m, bias) -> None:
    backend = _native_or_skip(torch.float32)
    x, w, b = _case(*shape, m, torch.float32, bias)
    pw = ops.pack_linear(w, backend)
    assert pw.packed is not None and pw.weight is w  # the plain weight stays for the reference path
    got = ops.linear(x, pw, b)
    assert got.dtype == torch.float32 and got.shape == (m, shape[0])
    want = reference.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the packed kernel itself, also at one row (where ops.linear keeps the reference's GEMV for fp32)
    torch.testing.assert_close(cpu.linear(x, pw.packed, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_bf16_matches_reference_within_rounding(shape, m, bias) -> None:
    backend = _native_or_skip(torch.bfloat16)
    x, w, b = _case(*shape, m, torch.bfloat16, bias)
    got = ops.linear(x, ops.pack_linear(w, backend), b)
    want = reference.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    # Both accumulate in fp32 and round to bf16, the reference once more after adding the bias: they may
    # differ by about one bf16 ulp (2^-8 relative) of the product and of the bias, whatever the sum's size.
    scale = want.float().abs().max() + (b.float().abs().max() if b is not None else 0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=float(scale) * 2 ** -7)


def test_linear_non_contiguous_input_and_empty_batch() -> None:
    backend = _native_or_skip(torch.float32)
    _, w, _ = _case(37, 53, 1, torch.float32, False)
    pw = ops.pack_linear(w, backend)
    x = torch.randn(53, 5).t()  # a transposed view
    torch.testing.assert_close(ops.linear(x, pw), reference.linear(x, w), rtol=1e-5, atol=1e-5)
    assert ops.linear(torch.randn(0, 53), pw).shape == (0, 37)


def test_reference_backend_keeps_plain_weight() -> None:
    x, w, b = _case(37, 53, 33, torch.float32, True)
    pw = ops.pack_linear(w, ops.select_backend("reference"))
    assert pw.packed is None
    assert torch.equal(ops.linear(x, pw, b), reference.linear(x, w, b))


def test_select_backend_names() -> None:
    assert ops.select_backend("reference").name == "reference"
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.select_backend("fast")
    with pytest.raises(ValueError, match="--kernels"):
        EngineArgs(kernels="fast").create_engine_config()
    assert EngineArgs(kernels="reference").create_engine_config().kernels == "reference"


# ---- the engine on each backend ------------------------------------------------------------------------
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17], [1, 20, 30]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=[("none", 0, 4), ("block", 2, 5), ("full", 0, 4)],
                ids=["none-L4", "block2-L5", "full-L4"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    mode, bs, layers = request.param
    folder, ref = write_tiny(tmp_path_factory.mktemp("m"), tiny_config(mode, bs, layers=layers))
    return folder, [reference_greedy(ref, p, GREEDY.max_tokens) for p in PROMPTS]


def _generate(folder, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), max_model_len=64, max_num_batched_tokens=5, block_size=4, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs], llm


def _packed(llm: LLM) -> list[bool]:
    return [m.packed is not None and m.packed.packed is not None
            for m in llm.engine.model.modules() if isinstance(m, PackedWeight)]


@pytest.mark.parametrize("kernels", ["native", "reference"])
def test_engine_greedy_equals_reference(model, kernels) -> None:
    if kernels == "native":
        _native_or_skip(torch.float32)
    folder, expected = model
    got, llm = _generate(folder, kernels=kernels)
    assert got == expected
    assert llm.engine.kernels.name == kernels
    packed = _packed(llm)
    assert packed and all(packed) if kernels == "native" else not any(packed)


def test_native_failure_at_startup_falls_back_with_one_warning(model, monkeypatch, caplog) -> None:
    def broken(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(cpu, "pack_linear", broken)
    folder, expected = model
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        got, llm = _generate(folder, kernels="native")
    warnings = [r for r in caplog.records if r.name == "depthserve.kernels" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not create a primitive descriptor" in warnings[0].getMessage()
    assert llm.engine.kernels.name == "reference" and "primitive descriptor" in llm.engine.kernels.reason
    assert not any(_packed(llm))
    assert got == expected


def test_missing_native_ops_fall_back(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu, "available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="depthserve.kernels"):
        backend = ops.select_backend("auto", (torch.float32, torch.float32))
    assert backend.name == "reference" and "no oneDNN" in backend.reason
    assert len([r for r in caplog.records if r.name == "depthserve.kernels"]) == 1
