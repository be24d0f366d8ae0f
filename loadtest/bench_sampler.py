"""Time per call of engine.sampler.Sampler on random rows: the engine's cost outside the model at decode.

    python -m loadtest.bench_sampler --vocab 49152 --batch 1 32 --reps 200

Cases per batch size: plain temperature sampling (unseeded and seeded: a seeded row draws from its own
generator), top-k + top-p, and greedy. Logits are N(0, 3^2), roughly an LM's spread. Prints the median
microseconds per call, wall clock and this thread's CPU time (one thread by default; on a shared machine the
CPU time is the steadier number, as other processes' load stretches the wall clock).
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


def time_case(sampler: Sampler, logits: torch.Tensor, params: dict[str, object],
              reps: int) -> tuple[float, float]:
    """Median microseconds of one Sampler call over `reps` calls (after a few warm-up calls): wall, thread CPU."""
    reqs = [Request(f"r{i}", [1], SamplingParams(**params)) for i in range(logits.shape[0])]
    for _ in range(5):
        sampler(logits, reqs)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        sampler(logits, reqs)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(wall) * 1e6, statistics.median(cpu) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(seed=0)
    print(f"| case | {' | '.join(f'batch {b}: wall / CPU (us)' for b in args.batch)} |")
    print(f"|---|{'---:|' * len(args.batch)}")
    logits = {b: 3 * torch.randn(b, args.vocab, generator=torch.Generator().manual_seed(b)) for b in args.batch}
    with torch.inference_mode():
        for name, params in CASES.items():
            cells = ["{:.0f} / {:.0f}".format(*time_case(sampler, logits[b], params, args.reps)) for b in args.batch]
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
