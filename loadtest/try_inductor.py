"""Trial: torch.compile (inductor, freezing on) of the whole model forward on CPU vs eager, decode steps.

Issue 13 asked to try inductor with freezing on the whole decode forward and keep whichever is faster. This
times decode steps of one engine with its model's forward eager and compiled (interleaved after the
compile's warm-up), at the SmolLM2 shape with random weights, and prints/writes both and the compile time.

    python -m loadtest.try_inductor --dtype bfloat16 --batch 1 32 --out bench_out/inductor.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.config import parse_dtype
from loadtest.bench_latency import make_engine, model_pair, model_shape, time_decode, write_json, write_random

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", choices=["standard", "attnres"], default="attnres")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out/inductor.json")
    a = ap.parse_args(argv)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    shape = model_shape(**SMOLLM2, max_len=256)
    cfg = model_pair(shape, 8)[0][a.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(write_random(Path(tmp) / a.model, cfg), parse_dtype(a.dtype), 256)
        model = eng.runner.model
        eager = model.forward
        compiled = torch.compile(eager, dynamic=True)
        for b in a.batch:
            t = time.perf_counter()
            model.forward = compiled  # type: ignore[method-assign]
            first = time_decode(eng, b, 4)  # compiles (the first call per shape pays it)
            compile_s = time.perf_counter() - t
            times: dict[str, list[float]] = {"eager": [], "inductor": []}
            for _ in range(a.repeats):
                for name, fwd in (("eager", eager), ("inductor", compiled)):
                    model.forward = fwd  # type: ignore[method-assign]
                    times[name].append(time_decode(eng, b, 16))
            del model.forward
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append({"batch": b, "eager_ms": med["eager"], "inductor_ms": med["inductor"],
                         "speedup": med["eager"] / med["inductor"], "compile_and_first_steps_s": compile_s,
                         "first_run_step_ms": first * 1e3})
            print(f"batch {b}: eager {med['eager']:.2f} ms, inductor {med['inductor']:.2f} ms per decode step "
                  f"({med['eager'] / med['inductor']:.2f}x); compile + first steps {compile_s:.0f} s")
    write_json(a.out, {"config": {**shape, "dtype": a.dtype, "model": a.model, "threads": torch.get_num_threads(),
                                  "kernels": eng.kernels.describe()}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
