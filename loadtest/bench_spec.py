"""Speculative decoding on a real checkpoint: `depthserve bench latency|throughput --model M --speculative-config J`.

One engine of the model, built with the speculative config, runs each round twice: with drafting switched
off in its scheduler (plain) and on (spec), interleaved (the first round warms up). Two engines of one model
differ by 3-7% at batch 1 here (where their weights land), more than the effect measured; one engine does not.
Workloads:

- copy: a chat request "Repeat this passage exactly" over a window of the text, greedy (speculation's best
  case: the answer is in the prompt);
- chat: an open question, greedy (what a chat user sends; the model repeats itself now and then);
- random: random token ids as the prompt, sampled at temperature 1 (no repetition at all: what speculation
  costs when every draft fails; backoff should make it near free).

Latency is batch 1, one request at a time: decode tokens per second from each request's first to last token
(the prefill is the same for both engines), the acceptance rate (accepted / drafted tokens), the mean tokens a
verified step emits, and whether greedy outputs are equal token for token. Throughput sends `--num-prompts`
copy requests at once. Medians over rounds; ratios are spec over plain within one run.

    depthserve bench latency --model smollm2-135m-instruct \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' --out bench_out/spec.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.outputs import RequestOutput, RequestOutputKind
from loadtest.bench_latency import sync, write_json
from loadtest.bench_models import BenchError, engine_args, load_text, model_name

WORKLOADS = ("copy", "chat", "random")
CHAT_QUESTIONS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a lake and a sea?",
    "Describe a walk through a forest in autumn.",
)


@dataclass(frozen=True)
class Job:
    """One request of a workload: its prompt tokens and sampling parameters."""

    prompt: list[int]
    params: SamplingParams


def _chat(llm: LLM, text: str) -> list[int]:
    tok = llm.engine.tokenizer
    assert tok is not None
    rendered = tok.apply_chat_template([{"role": "user", "content": text}]) if tok.chat_template else text
    return tok.encode(rendered, add_special_tokens=not tok.chat_template)


def make_jobs(llm: LLM, workload: str, text: str, n: int, passage_tokens: int, max_tokens: int,
              seed: int = 0) -> list[Job]:
    """`n` requests of a workload (prompts cut from `text` at different places)."""
    tok = llm.engine.tokenizer
    if tok is None:
        raise BenchError("the model has no tokenizer: speculative benchmarks run on text")
    rng = random.Random(seed)
    stream = tok.encode(text, add_special_tokens=False)
    if len(stream) < passage_tokens + 8:
        raise BenchError(f"the text is only {len(stream)} tokens: give a longer --prompts-file")
    greedy = dict(temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
    jobs = []
    for i in range(n):
        if workload == "copy":
            at = rng.randrange(0, len(stream) - passage_tokens)
            passage = tok.decode(stream[at:at + passage_tokens]).strip()
            prompt = _chat(llm, f"Repeat this passage exactly, word for word:\n\n{passage}")
            jobs.append(Job(prompt, SamplingParams(max_tokens=min(max_tokens, passage_tokens + 32), **greedy)))
        elif workload == "chat":
            prompt = _chat(llm, CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)])
            jobs.append(Job(prompt, SamplingParams(max_tokens=max_tokens, **greedy)))
        else:
            prompt = [rng.randrange(3, tok.vocab_size) for _ in range(64)]
            jobs.append(Job(prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, seed=i,
                                                   output_kind=RequestOutputKind.FINAL_ONLY)))
    limit = llm.engine.max_model_len
    return [j for j in jobs if len(j.prompt) + j.params.max_tokens <= limit]


def run_jobs(eng: LLMEngine, jobs: list[Job], tag: str) -> tuple[list[RequestOutput], float]:
    """All jobs at once through continuous batching; (outputs in job order, wall seconds)."""
    rids = [f"{tag}-{i}" for i in range(len(jobs))]
    sync(eng)
    t = time.perf_counter()
    for rid, j in zip(rids, jobs, strict=True):
        eng.add_request({"prompt_token_ids": j.prompt}, j.params, request_id=rid)
    final: dict[str, RequestOutput] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    sync(eng)
    return [final[r] for r in rids], time.perf_counter() - t


def _decode_rate(outs: list[RequestOutput]) -> float:
    """Tokens after the first over the time from first to last token, summed over requests (batch 1: the
    decode speed a user sees; the prefill is the same with and without drafts)."""
    tokens, seconds = 0, 0.0
    for r in outs:
        m, n = r.metrics, len(r.outputs[0].token_ids)
        if m is None or m.first_token_time is None or m.last_token_time is None or n < 2:
            continue
        tokens += n - 1
        seconds += m.last_token_time - m.first_token_time
    return tokens / seconds if seconds > 0 else 0.0


def _counters(eng: LLMEngine) -> tuple[int, int, int]:
    st = eng.stats()
    return st.spec_decode_num_drafts, st.spec_decode_num_draft_tokens, st.spec_decode_num_accepted_tokens


def compare(llm: LLM, jobs: list[Job], repeats: int, batched: bool) -> dict[str, Any]:
    """Interleaved rounds of the jobs without and with drafting: median tok/s, acceptance, equality of greedy
    outputs. batched: all jobs at once (throughput); else one job at a time (batch 1)."""
    rates: dict[str, list[float]] = {"plain": [], "spec": []}
    outs: dict[str, list[list[int]]] = {}
    drafts = draft_tokens = accepted = 0
    out_tokens = {"plain": 0, "spec": 0}
    eng = llm.engine
    spec_cfg = eng.scheduler.spec
    for rep in range(repeats + 1):
        for name in ("plain", "spec"):
            eng.scheduler.spec = spec_cfg if name == "spec" else None  # the scheduler drafts only with a config
            before = _counters(eng)
            groups = [jobs] if batched else [[j] for j in jobs]
            res: list[RequestOutput] = []
            wall = 0.0
            for i, g in enumerate(groups):
                r, dt = run_jobs(eng, g, f"{name}-{rep}-{i}")
                res += r
                wall += dt
            n_out = sum(len(r.outputs[0].token_ids) for r in res)
            after = _counters(eng)
            if rep:
                rates[name].append(n_out / wall if batched else _decode_rate(res))
                out_tokens[name] += n_out
                if name == "spec":
                    drafts += after[0] - before[0]
                    draft_tokens += after[1] - before[1]
                    accepted += after[2] - before[2]
            outs[name] = [list(r.outputs[0].token_ids) for r in res]
    eng.scheduler.spec = spec_cfg
    greedy = all(j.params.temperature == 0 for j in jobs)
    tok_s = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "requests": len(jobs), "output_tokens": out_tokens, "tok_s": tok_s, "speedup": tok_s["spec"] / tok_s["plain"],
        "verified_steps": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "tokens_per_verified_step": (accepted + drafts) / drafts if drafts else None,
        "greedy": greedy, "outputs_equal": outs["plain"] == outs["spec"] if greedy else None,
    }


def markdown(rows: dict[str, dict[str, Any]], batched: bool) -> str:
    unit = "output tok/s" if batched else "decode tok/s"
    head = ["workload", f"plain {unit}", f"spec {unit}", "spec / plain", "acceptance", "tokens / verified step",
            "greedy outputs equal"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for w, r in rows.items():
        tps = r["tokens_per_verified_step"]
        eq = "n/a (sampled)" if r["outputs_equal"] is None else ("yes" if r["outputs_equal"] else "NO")
        lines.append(f"| {w} | {r['tok_s']['plain']:.1f} | {r['tok_s']['spec']:.1f} | {r['speedup']:.3f}x | "
                     f"{r['acceptance_rate']:.1%} | {'-' if tps is None else f'{tps:.2f}'} | {eq} |")
    return "\n".join(lines)


def add_spec_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("speculative decoding (with --model: the model with and without it)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    g.add_argument("--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                   help="copy (repeat a passage), chat (open questions), random (random prompt, sampled)")
    g.add_argument("--spec-requests", type=int, default=4, help="requests per workload (batch 1: one at a time)")
    g.add_argument("--spec-max-tokens", type=int, default=128, help="output tokens per request (at most)")


def main(a: argparse.Namespace, batched: bool) -> int:
    """Both bench commands with --speculative-config: the model with and without speculation."""
    cmd = "throughput" if batched else "latency"
    if len(a.model) != 1 or a.baseline:
        print(f"depthserve bench {cmd}: error: --speculative-config times one --model against itself without "
              "speculation; give exactly one --model and no --baseline", file=sys.stderr)
        return 2
    try:
        spec_cfg = json.loads(a.speculative_config)
    except json.JSONDecodeError as e:
        print(f"depthserve bench {cmd}: error: --speculative-config is not valid JSON ({e})", file=sys.stderr)
        return 2
    dtype = a.dtype[0] if isinstance(a.dtype, list) else a.dtype
    n = a.num_prompts if batched else a.spec_requests
    args = engine_args("", dtype, max_num_seqs=max(64, n), device=a.device, num_threads=a.num_threads,
                       kv_cache_memory=a.kv_cache_memory)
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "model"}
    llm: LLM | None = None
    try:
        try:
            llm = LLM(a.model[0], **{**kwargs, "speculative_config": spec_cfg})
        except (ValueError, OSError) as e:
            raise BenchError(str(e)) from None
        text = load_text(a.prompts_file)
        rows = {w: compare(llm, make_jobs(llm, w, text, n, 160, a.spec_max_tokens), a.repeats, batched)
                for w in a.workload}
    except BenchError as e:
        print(f"depthserve bench {cmd}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if llm is not None:
            llm.shutdown()
    print(f"{model_name(a.model[0])}, {dtype}, {torch.get_num_threads()} threads, speculative_config {spec_cfg}, "
          f"{'all requests at once' if batched else 'batch 1'}")
    print(markdown(rows, batched))
    write_json(a.out, {"model": a.model[0], "dtype": dtype, "threads": torch.get_num_threads(), "batched": batched,
                       "speculative_config": spec_cfg, "workloads": rows})
    return 0
