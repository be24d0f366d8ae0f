"""Real checkpoints side by side: `depthserve bench latency|throughput --model A --baseline B`.

The random-weight benchmarks (bench_latency, bench_throughput) time a shape; these time the models a
researcher trained (folders, .gguf files or built-in names), on text: prompts are windows of a text file
(`--prompts-file`), or of the held-out Shakespeare that ships with the built-in models, tokenized by each
model's own tokenizer. Engines are built once and run in turn, A B A B, the first round a warm-up, and
medians are compared, as in bench_latency (this machine is noisy; a ratio within one run is what holds).

    depthserve bench latency --model ./runs/attnres --baseline ./runs/baseline --dtype bfloat16
    depthserve bench throughput --model shakespeare-attnres --baseline shakespeare-residual

Latency: one prompt's prefill (time to first token) and a decode step at each batch size. Throughput:
the same requests (lengths drawn once, seeded) through `LLM.generate` with continuous batching, output
tokens per second, and each request's TTFT and TPOT in that burst.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.arg_utils import EngineArgs
from engine.outputs import RequestOutput, RequestOutputKind
from loadtest.bench_latency import sync, write_json
from models.loader import BUILTIN_DIR

BUILTIN_TEXT = BUILTIN_DIR / "val_tokens.json"  # held-out Macbeth and Twelfth Night, as the built-in's token ids


class BenchError(Exception):
    """A problem the user can fix (a model that does not load, no tokenizer, a text too short)."""


def model_name(model: str) -> str:
    """A model's display name: its folder's (or file's) name, or the built-in name."""
    p = Path(model.rstrip("/\\"))
    return p.stem if p.suffix.lower() == ".gguf" else p.name


def builtin_text() -> str:
    """The held-out plays that ship with the built-in models, as text (their token ids decoded)."""
    from models.loader import load_tokenizer, resolve_model

    data = json.loads(BUILTIN_TEXT.read_text())
    tok = load_tokenizer(resolve_model("shakespeare-attnres"))
    assert tok is not None
    special = {data["bos_id"], data["eos_id"]}
    return tok.decode([i for i in data["ids"] if i not in special])


def load_text(path: str | Path | None) -> str:
    if path is None:
        return builtin_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read the prompts file {path}: {e}") from None
    if not text.strip():
        raise BenchError(f"the prompts file {path} is empty")
    return text


@dataclass
class Model:
    """One model under test: its engine (in an LLM, for engine.perplexity) and its tokens of the text."""

    name: str
    llm: LLM
    stream: list[int]  # the text's tokens (no special tokens)

    @property
    def engine(self) -> LLMEngine:
        return self.llm.engine

    def prompt(self, n: int, offset: int = 0) -> list[int]:
        """n tokens of the text from `offset` on (wrapping around), after the BOS token when there is one."""
        tok = self.engine.tokenizer
        bos = [tok.bos_token_id] if tok is not None and tok.bos_token_id is not None else []
        body = n - len(bos)
        s = self.stream
        return bos + [s[(offset + i) % len(s)] for i in range(body)]


def engine_args(model: str, dtype: str, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                device: str = "auto", kernels: str = "auto", num_threads: int | None = None,
                kv_cache_memory: str | None = None) -> EngineArgs:
    """Each model's engine options (kv_cache_memory None: 1 GiB on the CPU, the profiled rest on CUDA). No prefix
    caching: every round sends the same prompts, and a cached prefill would time nothing."""
    return EngineArgs(model=model, dtype=dtype, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False,
                      depth_cache_memory="512MiB", max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, device=device, kernels=kernels,
                      num_threads=num_threads)


def load_models(models: dict[str, str], text: str, args: EngineArgs) -> dict[str, Model]:
    """An engine per model (name -> folder or built-in name), and the text in each model's tokens."""
    out: dict[str, Model] = {}
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "model"}
    try:
        for name, path in models.items():
            try:
                llm = LLM(path, **kwargs)
            except (ValueError, OSError) as e:
                raise BenchError(f"{name}: {e}") from None
            out[name] = Model(name, llm, [])
            tok = llm.engine.tokenizer
            if tok is None:
                raise BenchError(f"{name} has no tokenizer: benchmarks on text need one")
            out[name].stream = tok.encode(text, add_special_tokens=False)
            if len(out[name].stream) < 8:
                raise BenchError(f"the text is only {len(out[name].stream)} tokens for {name}: give a longer "
                                 "--prompts-file")
    except BenchError:
        for m in out.values():
            m.llm.shutdown()
        raise
    return out


def time_prefill(m: Model, n: int) -> float:
    eng = m.engine
    eng.add_request({"prompt_token_ids": m.prompt(n)}, SamplingParams(max_tokens=1, ignore_eos=True))
    sync(eng)
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    sync(eng)
    return time.perf_counter() - t


def time_decode(m: Model, batch: int, steps: int, ctx: int) -> float:
    """Median seconds of one decode step with `batch` sequences of `ctx` prompt tokens (different windows)."""
    eng = m.engine
    for b in range(batch):
        eng.add_request({"prompt_token_ids": m.prompt(ctx, offset=b * 97)},
                        SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()  # prefill all (the step budget holds them; else the first decode steps carry prefill too)
    times = []
    while eng.has_unfinished_requests():
        sync(eng)
        t = time.perf_counter()
        eng.step()
        sync(eng)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:-1] or times)


def latency(models: dict[str, Model], prefill: Sequence[int], batch: Sequence[int], repeats: int = 3,
            steps: int = 16, ctx: int = 64) -> list[dict[str, Any]]:
    """Per case, each model's median ms; models run in turn (A B A B), the first round warms up."""
    limit = min(m.engine.max_model_len for m in models.values())
    rows = []
    cases = [("prefill", n) for n in prefill] + [("decode", b) for b in batch]
    for kind, n in cases:
        if kind == "prefill" and n > limit - 1:
            print(f"bench: skipping prefill {n}: above the smallest context length ({limit}) - 1", file=sys.stderr)
            continue
        c = min(ctx, limit - steps - 2)
        samples: dict[str, list[float]] = {k: [] for k in models}
        for rep in range(repeats + 1):
            for key, m in models.items():
                t = time_prefill(m, n) if kind == "prefill" else time_decode(m, n, steps, c)
                if rep:
                    samples[key].append(t)
        rows.append({"kind": kind, "n": n, "case": f"{kind} {'tokens' if kind == 'prefill' else 'batch'}={n}",
                     "ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()}})
    return rows


def generate(eng: LLMEngine, prompts: list[list[int]], outs: list[int]) -> list[RequestOutput]:
    """All requests at once through continuous batching (LLM.generate's loop on an engine we keep)."""
    rids = [f"tp-{i}" for i in range(len(prompts))]
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        eng.add_request({"prompt_token_ids": p}, SamplingParams(
            temperature=0.8, max_tokens=o, ignore_eos=True, seed=i, output_kind=RequestOutputKind.FINAL_ONLY),
            request_id=rids[i])
    final: dict[str, RequestOutput] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            final[out.request_id] = out
    sync(eng)
    return [final[r] for r in rids]


def throughput(models: dict[str, Model], num_prompts: int, input_len: tuple[int, int],
               output_len: tuple[int, int], repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """The same requests through each model's LLM.generate in turn; median output tok/s, per-request TTFT/TPOT
    of the last round."""
    rng = random.Random(seed)
    limit = min(m.engine.max_model_len for m in models.values())
    ins = [min(rng.randint(*input_len), limit - 2) for _ in range(num_prompts)]
    outs = [max(1, min(rng.randint(*output_len), limit - i)) for i in ins]
    tok_s: dict[str, list[float]] = {k: [] for k in models}
    per_request: dict[str, dict[str, list[float]]] = {}
    for rep in range(repeats + 1):
        for key, m in models.items():
            prompts = [m.prompt(n, offset=i * 131) for i, n in enumerate(ins)]
            t = time.perf_counter()
            res = generate(m.engine, prompts, outs)
            dt = time.perf_counter() - t
            if rep:
                tok_s[key].append(sum(outs) / dt)
            ttft, tpot = [], []
            for r in res:
                mt, n_out = r.metrics, len(r.outputs[0].token_ids)
                if mt is None or mt.first_token_time is None:
                    continue
                ttft.append((mt.first_token_time - mt.arrival_time) * 1e3)
                if n_out > 1 and mt.last_token_time is not None:
                    tpot.append((mt.last_token_time - mt.first_token_time) / (n_out - 1) * 1e3)
            per_request[key] = {"ttft_ms": ttft, "tpot_ms": tpot}
    return {"num_prompts": num_prompts, "input_tokens": sum(ins), "output_tokens": sum(outs),
            "tok_s": {k: statistics.median(v) for k, v in tok_s.items()}, "requests": per_request}


def _ratio_header(names: list[str]) -> list[str]:
    return [f"{n} / {names[-1]}" for n in names[:-1]]


def markdown_latency(rows: list[dict[str, Any]], names: list[str]) -> str:
    """One row per case: ms per model, and each model's time over the baseline's (the last)."""
    head = ["case", *[f"{n} ms" for n in names], *_ratio_header(names)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[n]:.2f}" for n in names] + [f"{ms[n] / ms[names[-1]]:.3f}x" for n in names[:-1]]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def markdown_throughput(result: dict[str, Any], names: list[str]) -> str:
    head = ["model", "output tok/s", "TTFT p50 ms", "TPOT p50 ms"]
    lines = [f"{result['num_prompts']} requests, {result['input_tokens']} prompt and {result['output_tokens']} "
             "output tokens, all at once", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n in names:
        req = result["requests"][n]
        ttft, tpot = _median(req["ttft_ms"]), _median(req["tpot_ms"])
        lines.append(f"| {n} | {result['tok_s'][n]:.1f} | {ttft or 0:.1f} | {tpot or 0:.2f} |")
    return "\n".join(lines)


def named(model: Sequence[str], baseline: Sequence[str]) -> dict[str, str]:
    """{display name: model}, the baselines last; distinct names (a suffix where two folders share one)."""
    out: dict[str, str] = {}
    for m in [*model, *baseline]:
        name, k = model_name(m), 2
        while name in out:
            name, k = f"{model_name(m)}-{k}", k + 1
        out[name] = m
    return out


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--model/--baseline/--prompts-file: real checkpoints instead of random weights of a shape."""
    g = ap.add_argument_group("real checkpoints (instead of random weights of a shape)")
    g.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help="a checkpoint folder, .gguf file or built-in name to time (repeatable)")
    g.add_argument("--baseline", action="append", default=[], metavar="MODEL",
                   help="the model(s) to compare against (repeatable; ratios are over the last)")
    g.add_argument("--prompts-file", default=None, metavar="PATH",
                   help="UTF-8 text the prompts are cut from (default: the built-in models' held-out plays)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--kv-cache-memory", default=None, help="each model's KV cache (default: the engine's)")
    from loadtest import bench_spec

    bench_spec.add_spec_args(ap)


def _setup(a: argparse.Namespace, dtype: str, max_num_seqs: int, max_tokens: int) -> dict[str, Model]:
    if not a.model or not a.baseline:
        raise BenchError("give a --model and a --baseline to compare it with")
    names = named(a.model, a.baseline)
    args = engine_args("", dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_tokens),
                       device=a.device, num_threads=a.num_threads, kv_cache_memory=a.kv_cache_memory)
    return load_models(names, load_text(a.prompts_file), args)


def latency_main(a: argparse.Namespace) -> int:
    """`depthserve bench latency --model A --baseline B` (bench_latency's parser, its shape flags unused)."""
    if a.speculative_config:
        from loadtest import bench_spec

        return bench_spec.main(a, batched=False)
    dtype = a.dtype[0] if isinstance(a.dtype, list) else a.dtype
    try:
        models = _setup(a, dtype, max(64, *a.batch), max(a.prefill))
    except BenchError as e:
        print(f"depthserve bench latency: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = latency(models, a.prefill, a.batch, a.repeats)
    finally:
        for m in models.values():
            m.engine.shutdown()
    names = list(models)
    print(markdown_latency(rows, names))
    write_json(a.out, {"models": {n: models[n].engine.config.model for n in names}, "dtype": dtype,
                       "threads": torch.get_num_threads(), "prompts_file": a.prompts_file, "rows": rows})
    return 0


def throughput_main(a: argparse.Namespace) -> int:
    """`depthserve bench throughput --model A --baseline B` (bench_throughput's parser)."""
    if a.speculative_config:
        from loadtest import bench_spec

        return bench_spec.main(a, batched=True)
    try:
        models = _setup(a, a.dtype, max(a.max_num_seqs), 2048)
    except BenchError as e:
        print(f"depthserve bench throughput: error: {e}", file=sys.stderr)
        return 2
    try:
        result = throughput(models, a.num_prompts, tuple(a.input_len), tuple(a.output_len), a.repeats, a.seed)
    finally:
        for m in models.values():
            m.engine.shutdown()
    names = list(models)
    print(markdown_throughput(result, names))
    write_json(a.out, {"models": {n: models[n].engine.config.model for n in names}, "dtype": a.dtype,
                       "threads": torch.get_num_threads(), "prompts_file": a.prompts_file, **result})
    return 0
