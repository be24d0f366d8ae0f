"""Trial: torch.compile (inductor, freezing on) of the whole model forward on CPU vs eager, decode steps.

Issue 13 asked to try inductor with freezing on the whole decode forward and keep whichever is faster. This
times decode steps of one engine with its model's forward eager and compiled (interleaved after the
compile's warm-up), at the SmolLM2 shape with random weights, and prints/writes both and the compile time.

    python -m loadtest.try_inductor --dtype bfloat16 --batch 1 32 --kernels reference --out bench_out/inductor.json

`--kernels reference` compiles the plain-torch model (inductor fuses what it can itself); the eager engine with
`--baseline` kernels (native) is timed alongside, interleaved.
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


def _without_inference_mode() -> None:
    """The engine steps under torch.inference_mode; inductor cannot compile a graph that mutates inference
    tensors in place ("Cannot set version_counter for inference tensor": the KV and depth writes), so for
    this trial the step and the forward run under no_grad instead (same math, no inference tensors)."""
    from engine.model_runner import ModelRunner
    from models.llama import LlamaForServing

    for cls, name in ((ModelRunner, "execute"), (LlamaForServing, "forward")):
        fn = getattr(cls, name)
        setattr(cls, name, torch.no_grad()(getattr(fn, "__wrapped__", fn)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", choices=["standard", "attnres"], default="attnres")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", default="auto",
                    help="the eager model's op set; `reference` lets inductor fuse plain torch ops itself")
    ap.add_argument("--baseline", default="native", help="an eager engine with these kernels, timed alongside "
                    "('' to skip): the one to beat")
    ap.add_argument("--layers", type=int, default=SMOLLM2["layers"], help="fewer for a quick check")
    ap.add_argument("--out", default="bench_out/inductor.json")
    a = ap.parse_args(argv)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    _without_inference_mode()
    shape = model_shape(**{**SMOLLM2, "layers": a.layers}, max_len=256)
    cfg = model_pair(shape, 8)[0][a.model]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random(Path(tmp) / a.model, cfg)
        eng = make_engine(folder, parse_dtype(a.dtype), 256, kernels=a.kernels)
        base = make_engine(folder, parse_dtype(a.dtype), 256, kernels=a.baseline) if a.baseline else None
        model = eng.runner.model
        eager = model.forward
        compiled = torch.compile(eager, dynamic=True)
        for b in a.batch:
            t = time.perf_counter()
            model.forward = compiled  # type: ignore[method-assign]
            first = time_decode(eng, b, 4)  # compiles (the first call per shape pays it)
            compile_s = time.perf_counter() - t
            times: dict[str, list[float]] = {"eager": [], "inductor": [], "baseline": []}
            for _ in range(a.repeats):
                for name, fwd in (("eager", eager), ("inductor", compiled)):
                    model.forward = fwd  # type: ignore[method-assign]
                    times[name].append(time_decode(eng, b, 16))
                if base is not None:
                    times["baseline"].append(time_decode(base, b, 16))
            del model.forward
            med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
            row = {"batch": b, "eager_ms": med["eager"], "inductor_ms": med["inductor"],
                   "speedup": med["eager"] / med["inductor"], "compile_and_first_steps_s": compile_s,
                   "first_run_step_ms": first * 1e3}
            line = (f"batch {b}: eager ({a.kernels}) {med['eager']:.2f} ms, inductor {med['inductor']:.2f} ms per "
                    f"decode step ({med['eager'] / med['inductor']:.2f}x); compile + first steps {compile_s:.0f} s")
            if "baseline" in med:
                row |= {"baseline_ms": med["baseline"], "inductor_vs_baseline": med["baseline"] / med["inductor"]}
                line += f"; eager ({a.baseline}) {med['baseline']:.2f} ms"
            rows.append(row)
            print(line)
            # written after every batch: a compile can take many minutes per shape
            write_json(a.out, {"config": {**shape, "dtype": a.dtype, "model": a.model,
                                          "threads": torch.get_num_threads(), "kernels": eng.kernels.describe(),
                                          "baseline": a.baseline}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
