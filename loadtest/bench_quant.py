"""Weight-streaming rate of the quantized small-M linear (depthserve::quant_linear, kernels/csrc/quant.cpp) on
Q8_0 / Q4_0 / Q4_1 against small_m_linear on the same weights in bf16, with this machine's read bandwidth
measured in the same run as the roofline.

Method as loadtest/bench_gemv.py (whose helpers it imports): per linear shape and M, every method reads its
weight from memory (its own least-recently-used rotation over copies adding up to --cold-mib, so no method
runs from a cache another has warmed), methods run interleaved (A B C D A B C D ...; the first round warms up),
each call is timed, medians and 10th percentiles reported. GB/s counts the bytes of the weight each method
reads (Q8_0 34 bytes per 32 weights, Q4_0 18, Q4_1 20, bf16 64), so at equal GB/s the quantized linear is
faster by the byte ratio; the per-step summary weights each linear by how often a decode step reads it.

`--int8` adds, per format, the int8-activation kernel (depthserve::int8_linear, kernels/csrc/quant_int8.cpp:
x rounded to int8 blocks, VNNI dot products) on its repacked copy of the weight ("q8_0 int8", ...): the kernel
that --quant-activations int8 runs past ops.INT8_MIN_M rows; its GB/s count the repacked bytes.

On a shared machine multi-threaded timings are only meaningful while the CPUs are otherwise idle (see
bench_gemv.py); --quiet-wait waits for idle CPUs before each shape, and the JSON records the idle fraction seen.

    python -m loadtest.bench_quant --out bench_out/quant.json
    python -m loadtest.bench_quant --m 1 --formats q8_0 --linears qkv down --out /tmp/q.json
    python -m loadtest.bench_quant --int8 --m 4 8 16 32 128 --out bench_out/quant_int8.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

import torch

from kernels import cpu_ext, quant
from loadtest.bench_gemv import MODELS, Cold, cpu_idle, time_calls, wait_quiet
from loadtest.bench_latency import read_bandwidth, write_json


def bench_shape(n_out: int, k: int, ms: list[int], formats: list[str], cold_bytes: int, repeats: int,
                budget_s: float, int8: bool = False) -> list[dict]:
    """One [N, K] linear: per M, each method's median / 10th-percentile us per call and GB/s of its weight."""
    g = torch.Generator().manual_seed(n_out + k)
    w = (torch.randn(n_out, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    weights: dict[str, Any] = {"bf16": w, **{f: quant.quantize(w.float(), quant.format_named(f)) for f in formats}}
    if int8:
        weights |= {f"{f} int8": quant.pack_int8(weights[f], quant.format_named(f)) for f in formats}
    nbytes = {key: t.nbytes if isinstance(t, quant.Int8Weight) else t.numel() * t.element_size()
              for key, t in weights.items()}
    def clone(key: str, t: Any) -> Any:
        if isinstance(t, quant.Int8Weight):  # "q8_0 int8": repack the format's blocks
            f = key.split()[0]
            return quant.pack_int8(weights[f], quant.format_named(f))
        return t.clone()

    copies = {key: [t] + [clone(key, t) for _ in range(max(1, -(-cold_bytes // nbytes[key])) - 1)]
              for key, t in weights.items()}
    colds = {key: Cold(len(c)) for key, c in copies.items()}
    types = {f: quant.format_named(f).ggml_type for f in formats}
    ops = torch.ops.depthserve
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        calls = {"bf16": lambda i, x=x: ops.small_m_linear(x, copies["bf16"][i])}
        for f in formats:
            calls[f] = lambda i, x=x, f=f: ops.quant_linear(x, copies[f][i], types[f])
            if int8:
                calls[f"{f} int8"] = lambda i, x=x, f=f: ops.int8_linear(x, copies[f"{f} int8"][i].w8,
                                                                        copies[f"{f} int8"][i].d,
                                                                        copies[f"{f} int8"][i].m, n_out,
                                                                        copies[f"{f} int8"][i].offset)
        samples: dict[str, list[float]] = {key: [] for key in calls}
        for rep in range(repeats + 1):
            for key, call in calls.items():
                t = time_calls(call, colds[key], budget_s)
                if rep:
                    samples[key] += t
        med = {key: statistics.median(v) for key, v in samples.items()}
        p10 = {key: statistics.quantiles(v, n=10)[0] if len(v) > 1 else v[0] for key, v in samples.items()}
        rows.append({"n": n_out, "k": k, "m": m, "weight_bytes": nbytes,
                     "copies": {key: len(c) for key, c in copies.items()},
                     "calls": {key: len(v) for key, v in samples.items()},
                     "us": {key: s * 1e6 for key, s in med.items()}, "us_p10": {key: s * 1e6 for key, s in p10.items()},
                     "gbs": {key: nbytes[key] / s / 1e9 for key, s in med.items()},
                     "gbs_p10": {key: nbytes[key] / s / 1e9 for key, s in p10.items()},
                     "speedup_vs_bf16": {key: med["bf16"] / s for key, s in med.items()}})
    return rows


def step_summary(rows: list[dict], layers: int, bandwidth: float) -> list[dict]:
    """Per M and method: the linears' bytes over their summed median time, each weighted by how often a decode
    step reads it (per layer; lm_head once), its fraction of the roofline and the step's speedup over bf16."""
    out = []
    for m in dict.fromkeys(r["m"] for r in rows):
        case = [r for r in rows if r["m"] == m]
        reps = [1 if r["layer"] == "lm_head" else layers for r in case]
        keys = list(case[0]["us"])
        us = {key: sum(r["us"][key] * n for r, n in zip(case, reps, strict=True)) for key in keys}
        nbytes = {key: sum(r["weight_bytes"][key] * n for r, n in zip(case, reps, strict=True)) for key in keys}
        gbs = {key: nbytes[key] / (us[key] * 1e3) for key in keys}
        out.append({"m": m, "step_us": us, "step_weight_bytes": nbytes, "gbs": gbs,
                    "roofline_fraction": {key: v / bandwidth for key, v in gbs.items()},
                    "speedup_vs_bf16": {key: us["bf16"] / v for key, v in us.items()}})
    return out


def markdown(rows: list[dict], steps: list[dict], bandwidth: float) -> str:
    keys = list(rows[0]["us"])
    head = ["linear", "N x K", "M", *[f"{key} GB/s (roof)" for key in keys], *[f"{key} vs bf16" for key in keys[1:]]]
    lines = [f"read roofline: {bandwidth:.1f} GB/s", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["layer"], f"{r['n']} x {r['k']}", str(r["m"]),
                                        *[f"{r['gbs'][key]:.1f} ({r['gbs'][key] / bandwidth:.2f})" for key in keys],
                                        *[f"{r['speedup_vs_bf16'][key]:.2f}x" for key in keys[1:]]]) + " |")
    lines += ["", "Per decode step (SmolLM2-135M: 30 layers + lm_head), GB/s (roofline fraction), speedup vs bf16:",
              "", "| M | " + " | ".join(keys) + " |", "|" + "---|" * (1 + len(keys))]
    for s in steps:
        lines.append(f"| {s['m']} | " + " | ".join(
            f"{s['gbs'][key]:.1f} ({s['roofline_fraction'][key]:.2f}) {s['speedup_vs_bf16'][key]:.2f}x"
            for key in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_1"], choices=list(quant.FORMATS))
    ap.add_argument("--linears", nargs="+", default=list(MODELS["smollm2"][1]), choices=list(MODELS["smollm2"][1]))
    ap.add_argument("--cold-mib", type=int, default=128, help="weight copies per method (4x the 32 MiB L3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=0.15, help="seconds per method per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--int8", action="store_true", help="also the int8-activation kernel per format")
    ap.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to this long for idle CPUs per shape")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ext.load() is None or not quant.native_available():
        raise SystemExit("the native library did not load (see the warning)")
    bw_before = read_bandwidth()
    layers, shapes = MODELS["smollm2"]
    rows, idle = [], []
    for name in args.linears:
        idle.append(wait_quiet(args.quiet_wait) if args.quiet_wait else cpu_idle())
        for r in bench_shape(*shapes[name], args.m, args.formats, args.cold_mib << 20, args.repeats, args.budget_s,
                             args.int8):
            rows.append({"layer": name, **r})
    bw_after = read_bandwidth()
    bandwidth = max(bw_before, bw_after)
    steps = step_summary(rows, layers, bandwidth) if set(args.linears) == set(shapes) else []
    table = markdown(rows, steps, bandwidth)
    print(table)
    write_json(args.out, {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "read_bandwidth_gbs": bandwidth, "bandwidth_before_after": [bw_before, bw_after],
                          "cpu_idle_before_shapes": idle, "args": vars(args), "rows": rows, "steps": steps,
                          "markdown": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
