"""Time per call of engine.sampler.Sampler on random rows: the engine's cost outside the model at decode.

    python -m loadtest.bench_sampler --vocab 49152 --batch 1 32 --reps 200

Cases per batch size: plain temperature sampling (unseeded and seeded: a seeded row draws from its own
generator), top-k + top-p, and greedy. Logits are N(0, 3^2), roughly an LM's spread. Prints the median
microseconds per call (one thread by default: the engine's step runs the sampler on its own thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

CASES: dict[str, dict[str, object]] = {
    "temperature 0.8": {"temperature": 0.8},
    "temperature 0.8, seeded": {"temperature": 0.8, "seed": 7},
    "top-k 50, top-p 0.9": {"temperature": 0.8, "top_k": 50, "top_p": 0.9},
    "greedy": {"temperature": 0.0},
}


def time_case(sampler: Sampler, logits: torch.Tensor, params: dict[str, object], reps: int) -> float:
    """Median microseconds of one Sampler call over `reps` calls (after a few warm-up calls)."""
    reqs = [Request(f"r{i}", [1], SamplingParams(**params)) for i in range(logits.shape[0])]
    for _ in range(5):
        sampler(logits, reqs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sampler(logits, reqs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(seed=0)
    print(f"| case | {' | '.join(f'batch {b} (us)' for b in args.batch)} |")
    print(f"|---|{'---:|' * len(args.batch)}")
    logits = {b: 3 * torch.randn(b, args.vocab, generator=torch.Generator().manual_seed(b)) for b in args.batch}
    with torch.inference_mode():
        for name, params in CASES.items():
            cells = [f"{time_case(sampler, logits[b], params, args.reps):.0f}" for b in args.batch]
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
