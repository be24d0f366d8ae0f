"""Per-op time of the native C++ CPU ops (kernels/csrc) against the reference ops, called the way the model
calls them (through a KernelSet, on strided views of a depth pool). Prints a Markdown table and writes JSON.

    python -m loadtest.bench_ops --hidden 576 --tokens 1 32 --dtype float32 bfloat16 --out bench_out/ops.json

Defaults: SmolLM2-135M's shape (hidden 576, ffn 1536, 9 query and 3 KV heads of 64) and a Block AttnRes pool
of 8 blocks with 4 layers each (Q = 8 Phase-1 queries, Phase 1 over 5 completed sources). store_kv writes into
a cache of 4096 slots, the rows' slots scattered over it. The two implementations alternate within each
repetition and the median per call is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import parse_dtype
from kernels import ops


def _cases(k: ops.KernelSet, t: int, d: int, dtype: torch.dtype, sources: int, q: int, n: int, ffn: int,
           heads: tuple[int, int, int]) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dt)

    eps = 1e-5
    w = (1 + 0.1 * rand(d)).to(dtype)
    x, delta, h = rand(t, d, dt=dtype), rand(t, d, dt=dtype), rand(t, d, dt=dtype)
    states, keys = rand(t, sources, d), rand(t, sources, d)
    lse, xo, queries, query = rand(t, q), rand(t, q, d), 0.1 * rand(q, d), 0.1 * rand(d)
    gu = rand(t, 2 * ffn, dt=dtype)  # the MLP's merged gate/up output
    nh, kv, hd = heads  # not `h`: that is add_rms_norm's residual above
    qkv = rand(t, nh + 2 * kv, hd, dt=dtype)  # k, v: views of the QKV output, as the model passes them
    k_cache, v_cache = rand(4096, kv, hd, dt=dtype), rand(4096, kv, hd, dt=dtype)
    slots = torch.randperm(4096, generator=g)[:t]
    return {
        "rms_norm": lambda: k.rms_norm(x, w, eps),
        "rms_norm(xo view)": lambda: k.rms_norm(xo[:, 1], w, eps),
        "add_rms_norm": lambda: k.add_rms_norm(delta, h, w, eps),
        "attnres_site": lambda: k.attnres_site(states[:, n], delta, lse[:, 3], xo[:, 3], query, w, eps),
        "attnres_phase1": lambda: k.attnres_phase1(states, keys, n, queries, lse, xo, eps),
        "silu_mul": lambda: k.silu_mul(gu),
        "store_kv": lambda: k.store_kv(qkv[:, nh:nh + kv], qkv[:, nh + kv:], k_cache, v_cache, slots),
        # the Block output head: the final partial += delta, its key, the mix of all sources, the final norm
        "attnres_mix(output)": lambda: k.attnres_mix(states, keys, sources, delta, query, w, eps, True),
    }


def time_call(fn: Callable[[], object], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def run(hidden: int, tokens: list[int], dtypes: list[torch.dtype], blocks: int, block_size: int, n: int,
        reps: int, min_time: float, ffn: int = 1536, heads: tuple[int, int, int] = (9, 3, 64),
        only: list[str] | None = None) -> list[dict]:
    native = ops.kernel_set(ops.Backend("reference", "native"))
    if not native.native_ops():
        raise SystemExit("native CPU ops unavailable (see the warning); nothing to compare")
    rows = []
    for dtype in dtypes:
        for t in tokens:
            impls = {name: _cases(k, t, hidden, dtype, blocks + 1, 2 * block_size, n, ffn, heads)
                     for name, k in (("reference", ops.REFERENCE_OPS), ("native", native))}
            for op in impls["reference"]:
                if only and op not in only:
                    continue
                fns = {name: cases[op] for name, cases in impls.items()}
                iters = {}
                for name, fn in fns.items():  # warm up, and size the loop to about min_time
                    fn()
                    one = time_call(fn, 3)
                    iters[name] = max(3, int(min_time / max(one, 1e-7)))
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(reps):
                    for name, fn in fns.items():
                        times[name].append(time_call(fn, iters[name]))
                ref_us, nat_us = (statistics.median(times[name]) * 1e6 for name in ("reference", "native"))
                rows.append({"op": op, "dtype": str(dtype).removeprefix("torch."), "tokens": t, "hidden": hidden,
                             "reference_us": round(ref_us, 2), "native_us": round(nat_us, 2),
                             "speedup": round(ref_us / nat_us, 2)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536, help="intermediate size (silu_mul)")
    p.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("H", "KV", "HD"),
                   help="query heads, KV heads, head dim (store_kv)")
    p.add_argument("--ops", nargs="+", default=None, help="time only these ops (default: all)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--blocks", type=int, default=8, help="completed-block slots of the pool (N)")
    p.add_argument("--block-size", type=int, default=4, help="layers per block (Q = 2 * block size)")
    p.add_argument("--sources", type=int, default=5, help="completed sources Phase 1 reads (n)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.hidden, args.tokens, [parse_dtype(d) for d in args.dtype], args.blocks, args.block_size,
               args.sources, args.reps, args.min_time, args.ffn, tuple(args.heads), args.ops)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times per call (median of {args.reps})\n")
    print("| op | dtype | T | reference µs | native µs | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['dtype']} | {r['tokens']} | {r['reference_us']:.1f} | {r['native_us']:.1f} | "
              f"{r['speedup']:.2f}x |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
