"""Batch-1 decode with and without the fused decode layer (kernels/csrc/decode_layer.cpp), interleaved in one
process, against the memory-bandwidth roofline.

Three engines of one random checkpoint (SmolLM2-135M's shape by default) take turns running
bench_throughput.decode_profile (A B C A B C, medians of each turn's median step): "per-op" with the fused path
turned off (model.fused_layers = None), "layer" with one native call per layer (decode_layers made to refuse, so
the model falls back to decode_layer), and "step" with every layer in one call (the default). The roofline is bench_throughput's: weight bytes / read bandwidth
(bench_latency.read_bandwidth), measured in the same run.

    python -m loadtest.fused_decode_ab --model standard attnres --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from loadtest.bench_latency import make_engine, model_pair, model_shape, read_bandwidth, write_random
from loadtest.bench_throughput import decode_profile, weight_bytes

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=["standard", "attnres"], default=["standard", "attnres"])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="decode steps per decode_profile turn")
    a = ap.parse_args(argv)
    shape = model_shape(**SMOLLM2, max_len=256)
    cfgs, _ = model_pair(shape, a.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        for m in a.model:
            folder = write_random(Path(tmp) / m, cfgs[m])
            engines = {k: make_engine(folder, torch.bfloat16, 256) for k in ("per-op", "layer", "step")}
            engines["per-op"].runner.model.fused_layers = None
            layer_model = engines["layer"].runner.model
            layer_model.k = dataclasses.replace(layer_model.k, decode_layers=lambda *args, **kw: None)
            if engines["step"].runner.model.fused_layers is None:
                print(f"{m}: the fused decode layer is not in use here (kernels: {engines['step'].kernels.describe()})")
            wbytes = weight_bytes(engines["step"])
            read_bw = read_bandwidth() * 1e9
            roof_ms = wbytes / read_bw * 1e3
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in engines}
            for _ in range(a.rounds):
                for k, eng in engines.items():
                    runs[k].append(decode_profile(eng, 1, a.steps))
            print(f"{m}: {wbytes / 1e6:.0f} MB of weights, read bandwidth {read_bw / 1e9:.1f} GB/s, "
                  f"roofline {roof_ms:.2f} ms; threads {torch.get_num_threads()}")
            for k, rs in runs.items():
                step = statistics.median(r["step_ms"] for r in rs)
                fwd = statistics.median(r["forward_ms"] for r in rs)
                turns = " ".join(f"{r['step_ms']:.2f}" for r in rs)
                print(f"  {k:7s} step {step:6.2f} ms (model {fwd:6.2f} ms): {roof_ms / step:.2f} of the roofline; "
                      f"turns: {turns}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
