"""Per-op profile of one decode step: where a step's time goes, on each kernels backend.

Random weights of a model shape (default: SmolLM2-135M's), `batch` sequences of ~`ctx` tokens decoding;
`torch.profiler` over `steps` engine steps, ops ranked by self CPU time per step. Prints one Markdown
table per (model, backend) and writes JSON.

    python -m loadtest.profile_step --kernels reference native --batch 32 --out bench_out/profile.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine import LLMEngine, SamplingParams
from engine.config import parse_dtype
from loadtest.bench_latency import make_engine, model_pair, model_shape, write_json, write_random

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)


def profile_decode(eng: LLMEngine, batch: int, steps: int, ctx: int, top: int) -> dict:
    """Self CPU time per step of the `top` costliest ops over `steps` decode steps (after two warm-up steps)."""
    for _ in range(batch):
        ids = torch.randint(3, eng.model_config.vocab_size, (ctx,)).tolist()
        eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
    eng.step()  # the prompts
    eng.step()
    eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "us_per_step": e.self_cpu_time_total / steps,
             "pct": 100 * e.self_cpu_time_total / total} for e in events[:top]]
    return {"step_us": total / steps, "ops": rows}


def markdown(title: str, result: dict) -> str:
    lines = [f"**{title}**: {result['step_us'] / 1e3:.2f} ms of op time per step", "",
             "| op | calls/step | us/step | share |", "|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['calls_per_step']:.0f} | {r['us_per_step']:.0f} | {r['pct']:.1f}% |"
              for r in result["ops"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", nargs="+", default=["reference", "native"])
    ap.add_argument("--models", nargs="+", choices=["standard", "attnres"], default=["standard", "attnres"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--out", default="bench_out/profile.json")
    a = ap.parse_args(argv)
    shape = model_shape(**SMOLLM2, max_len=a.ctx + a.steps + 64)
    cfgs, _ = model_pair(shape, a.blocks)
    out: dict = {"config": {**shape, "dtype": a.dtype, "batch": a.batch, "ctx": a.ctx, "blocks": a.blocks,
                            "threads": torch.get_num_threads()}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.models:
            folder = write_random(Path(tmp) / m, cfgs[m])
            for k in a.kernels:
                eng = make_engine(folder, parse_dtype(a.dtype), shape["max_position_embeddings"], kernels=k)
                res = profile_decode(eng, a.batch, a.steps, a.ctx, a.top)
                res["resolved"] = eng.kernels.describe()
                key = f"{m}/{k}"
                out["runs"][key] = res
                print(markdown(f"{m}, kernels {k} ({res['resolved']}), {a.dtype}, batch {a.batch}", res) + "\n")
                del eng
    write_json(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
