"""Depth drafts (speculative method "depth", issue 15 part 2) on the built-in AttnRes model: acceptance rate
and tokens per verified step for each exit block, and the batch-1 speed-up over plain decoding.

Prompts are windows of the held-out Shakespeare that ships with the built-in models (its token ids), each
decoded alone (batch 1), greedy, ignore_eos. Plain and speculative engines are built once and run in turn,
A B A B, after a warm-up round; medians of output tok/s are compared (the machine is shared and noisy: the
ratio within one run is what holds). Greedy output must be identical token for token.

    PYTHONPATH=. python loadtest/bench_depth_drafts.py [--exit-blocks 1 2 3] [--k 2 4] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine import LLM, SamplingParams
from loadtest.bench_latency import write_json
from models.loader import BUILTIN_DIR

MODEL = "shakespeare-attnres"
RESULT = Path(__file__).parent / "results" / "depth_drafts.json"


def prompts_from_held_out(n: int, length: int) -> list[list[int]]:
    """n windows of `length` token ids, spread over the held-out text, each after a BOS."""
    data = json.loads((BUILTIN_DIR / "val_tokens.json").read_text())
    special = {data["bos_id"], data["eos_id"]}
    ids = [i for i in data["ids"] if i not in special]
    step = (len(ids) - length) // n
    return [[data["bos_id"], *ids[j * step:j * step + length]] for j in range(n)]


def run_one(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """One prompt alone (batch 1): (seconds, its output tokens)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
    return time.perf_counter() - t0, out


class StepTimer:
    """Wall time of a runner's steps and of its draft passes (method wrappers on one instance), for a cost
    breakdown: a step with drafts = the draft passes + the verification forward (and sampling)."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.engine.runner
        self.plain_steps: list[float] = []  # steps without draft passes
        self.draft_steps: list[float] = []  # steps with draft passes (and their verification)
        self.drafts: list[float] = []  # the draft passes of those steps
        self.active = False
        execute, depth_drafts = runner.execute, runner._depth_drafts

        def timed_drafts(*a: Any) -> None:
            t0 = time.perf_counter()
            depth_drafts(*a)
            if self.active:
                self.drafts.append(time.perf_counter() - t0)

        def timed_execute(*a: Any) -> Any:
            n, t0 = len(self.drafts), time.perf_counter()
            out = execute(*a)
            if self.active:
                (self.draft_steps if len(self.drafts) > n else self.plain_steps).append(time.perf_counter() - t0)
            return out

        runner.execute, runner._depth_drafts = timed_execute, timed_drafts


def measure(exit_block: int, k: int, plain: LLM, prompts: list[list[int]], max_tokens: int, rounds: int,
            dtype: str, threads: int) -> dict[str, Any]:
    spec = LLM(MODEL, dtype=dtype, max_model_len=512, num_threads=threads,
               speculative_config={"method": "depth", "num_speculative_tokens": k, "exit_block": exit_block})
    st = spec.engine.scheduler.stats
    timers = StepTimer(plain), StepTimer(spec)
    run_one(plain, prompts[0], 16)  # warm-up
    run_one(spec, prompts[0], 16)
    before = (st.spec_num_drafts, st.spec_num_draft_tokens, st.spec_num_accepted_tokens)
    for t in timers:
        t.active = True
    a_rates, b_rates, same = [], [], True
    for _ in range(rounds):  # A B per prompt: the two engines see the same machine load, as nearly as can be
        a_s = b_s = 0.0
        n = 0
        for p in prompts:
            (ta, a_out), (tb, b_out) = run_one(plain, p, max_tokens), run_one(spec, p, max_tokens)
            a_s, b_s, n = a_s + ta, b_s + tb, n + len(a_out)
            same &= a_out == b_out
        a_rates.append(n / a_s)
        b_rates.append(n / b_s)
    drafts, drafted, accepted = (x - y for x, y in zip(
        (st.spec_num_drafts, st.spec_num_draft_tokens, st.spec_num_accepted_tokens), before, strict=True))
    spec.shutdown()
    plain_t, spec_t = timers
    plain_t.active = False
    median_ms = (lambda xs: 1e3 * statistics.median(xs) if xs else 0.0)  # noqa: E731
    tok_a, tok_b = statistics.median(a_rates), statistics.median(b_rates)
    return {"exit_block": exit_block, "num_speculative_tokens": k, "verified_steps": drafts,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_verified_step": 1 + accepted / drafts if drafts else 1.0,
            "tok_s_spec": tok_b, "tok_s_plain": tok_a, "ratio": tok_b / tok_a,
            "ratio_median_of_rounds": statistics.median(b / a for a, b in zip(a_rates, b_rates, strict=True)),
            "identical_output": same,
            # cost breakdown (medians): a plain decode step; a spec step with drafts = its k draft passes + the
            # verification forward of 1 + k rows; the share of steps that drafted (the rest: backoff, first token)
            "ms_plain_step": median_ms(plain_t.plain_steps), "ms_draft_passes": median_ms(spec_t.drafts),
            "ms_spec_step_with_drafts": median_ms(spec_t.draft_steps),
            "spec_steps": len(spec_t.plain_steps) + len(spec_t.draft_steps), "spec_steps_with_drafts":
            len(spec_t.draft_steps), "plain_steps": len(plain_t.plain_steps),
            "tok_s_spec_all": b_rates, "tok_s_plain_all": a_rates}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exit-blocks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="num_speculative_tokens values")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier on a shared 2-core machine, where spinning threads collide)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    prompts = prompts_from_held_out(args.prompts, args.prompt_len)
    plain = LLM(MODEL, dtype=args.dtype, max_model_len=512, num_threads=args.threads)
    rows = [measure(e, k, plain, prompts, args.max_tokens, args.rounds, args.dtype, args.threads)
            for e in args.exit_blocks for k in args.k]
    print(f"\n{MODEL}, batch 1, greedy, {args.prompts} held-out prompts of {args.prompt_len} tokens, "
          f"{args.max_tokens} output tokens, {torch.get_num_threads()} threads, medians of {args.rounds} A B rounds\n")
    print("| exit_block | num_speculative_tokens | acceptance rate | mean tokens per verified step | tok/s spec "
          "| tok/s plain | ratio | identical output | ms plain step | ms draft passes | ms step with drafts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['exit_block']} | {r['num_speculative_tokens']} | {r['acceptance_rate']:.1%} | "
              f"{r['tokens_per_verified_step']:.2f} | {r['tok_s_spec']:.0f} | {r['tok_s_plain']:.0f} | "
              f"{r['ratio']:.2f} | {'yes' if r['identical_output'] else 'NO'} | {r['ms_plain_step']:.2f} | "
              f"{r['ms_draft_passes']:.2f} | {r['ms_spec_step_with_drafts']:.2f} |")
    write_json(args.out, {"model": MODEL, "prompts": args.prompts, "prompt_len": args.prompt_len,
                          "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
                          "dtype": args.dtype, "command": "PYTHONPATH=. python loadtest/bench_depth_drafts.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
