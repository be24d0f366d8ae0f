"""Weight-streaming rate of small-M linears: torch (mv / F.linear), oneDNN packed, and depthserve's
small_m_linear (kernels/csrc/linear.cpp), against this machine's read bandwidth measured in the same run.

A decode step at small M reads every weight once, so the figure of merit is GB/s of weight streamed
(weight bytes / seconds per call) and its fraction of the read bandwidth (the roofline: loadtest.
bench_latency.read_bandwidth, the better of a measurement before and after). Every call reads its weight
from memory, not the caches: all methods share one least-recently-used rotation over copies of the weight
adding up to --cold-mib (default 4x a 32 MiB L3), as in a real step, where the whole model passes through
the caches. Methods run interleaved (A B C A B C ...; the first round warms up), each call is timed, and
medians and 10th percentiles are reported.

On a shared machine, multi-threaded timings are only meaningful while the CPUs are otherwise idle: a
parallel region waits for its slowest thread, and a thread that has to wait for a core turns a 50 us call
into a 10 ms one, for torch's ops and this kernel alike. --quiet-wait waits for idle CPUs before each
shape; --threads 1 gives stable per-core numbers (the roofline is then one core's read rate).

    python -m loadtest.bench_gemv --quiet-wait 120 --out bench_out/gemv.json
    python -m loadtest.bench_gemv --threads 1 --models smollm2 --m 1 4 --dtype bfloat16 \
        --variant r24=-DDS_GEMV_R=2,-DDS_GEMV_MB=4

linear.cpp is built alone here (torch.utils.cpp_extension, -O3 -march=native -fopenmp), once per variant;
--variant NAME=-DMACRO=V,... builds another with linear.cpp's tuning macros set.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu, reference
from loadtest.bench_latency import read_bandwidth, write_json

ROOT = Path(__file__).resolve().parents[1]

# name: (layers, {linear: (N, K)}); layer counts weight the per-step figure (SmolLM2-135M: 30 layers,
# Llama-3.2-1B shapes: 16; their lm_heads are read once per step)
MODELS = {
    "smollm2": (30, {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
                     "lm_head": (49152, 576)}),
    "1b": (16, {"qkv": (3072, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build(name: str, defines: list[str], build_dir: Path):
    """Compile linear.cpp alone with `defines`, its op in namespace `name`: returns the op."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=f"bench_gemv_{name}", sources=[str(ROOT / "kernels/csrc/linear.cpp")],
                       is_python_module=False, build_directory=str(build_dir),
                       extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DDS_GEMV_LIBRARY=bench_{name}",
                                     *defines])
    return getattr(torch.ops, f"bench_{name}").small_m_linear


def onednn_problem(dtype: torch.dtype) -> str | None:
    """None when kernels/cpu.py's packed linear runs and is right for `dtype`, else why not."""
    if not cpu.available():
        return "no oneDNN linear ops in this torch"
    try:
        w, x = torch.randn(19, 23).to(dtype), torch.randn(3, 23).to(dtype)
        got = cpu.linear(x, cpu.pack_linear(w))
        if not torch.allclose(got.float(), reference.linear(x, w).float(), rtol=5e-2, atol=5e-2):
            return "disagrees with the reference"
    except Exception as e:  # noqa: BLE001 - an unsupported dtype/CPU raises from inside oneDNN
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def cpu_idle(seconds: float = 0.5) -> float:
    """Fraction of all CPUs' time spent idle over the next `seconds` (Linux /proc/stat; 1.0 elsewhere)."""
    def sample() -> tuple[int, int]:
        v = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return 1.0
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_s: float, idle: float = 0.9) -> float:
    """Wait (at most `max_s`) until the CPUs are `idle` idle: other processes make multi-threaded timings
    meaningless (a parallel region waits for its slowest thread). Returns the idle fraction last seen."""
    end, seen = time.monotonic() + max_s, 1.0
    while max_s > 0:
        seen = cpu_idle()
        if seen >= idle or time.monotonic() >= end:
            break
    return seen


class Cold:
    """Hands out weight copies round-robin across all methods: every call gets the copy least recently read,
    so with copies adding up to several L3s each call reads its weight from memory."""

    def __init__(self, copies: int):
        self.copies, self.next = copies, 0

    def take(self) -> int:
        i = self.next
        self.next = (i + 1) % self.copies
        return i


def time_calls(call, cold: Cold, budget_s: float) -> list[float]:
    """Seconds of each call(i) (i: the next cold copy), calls timed one by one until `budget_s` passed."""
    out, t_end = [], time.perf_counter() + budget_s
    while True:
        i = cold.take()
        t = time.perf_counter()
        call(i)
        done = time.perf_counter()
        out.append(done - t)
        if done >= t_end or len(out) >= 4 * cold.copies:
            return out


def bench_shape(n_out: int, k: int, dtype: torch.dtype, ms: list[int], ops: dict, use_onednn: bool,
                cold_bytes: int, repeats: int, budget_s: float) -> list[dict]:
    """One (N, K, dtype): per M, each method's median (and 10th-percentile) seconds per call, and the GB/s
    of weight those give. Each round runs every method for `budget_s` in turn; the first round warms up."""
    nbytes = n_out * k * dtype.itemsize
    copies = max(1, -(-cold_bytes // nbytes))
    g = torch.Generator().manual_seed(n_out + k)
    ws = [(torch.randn(n_out, k, generator=g) / k ** 0.5).to(dtype) for _ in range(copies)]
    packed = [cpu.pack_linear(w) for w in ws] if use_onednn else []
    cold = Cold(copies)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g).to(dtype)
        methods = {"torch": (lambda i, x=x: torch.mv(ws[i], x[0])) if m == 1 else (lambda i, x=x: F.linear(x, ws[i]))}
        if packed:
            methods["onednn"] = lambda i, x=x: cpu.linear(x, packed[i])
        for name, op in ops.items():
            methods[name] = lambda i, x=x, op=op: op(x, ws[i])
        samples: dict = {key: [] for key in methods}
        for rep in range(repeats + 1):
            for key, call in methods.items():
                t = time_calls(call, cold, budget_s)
                if rep:
                    samples[key] += t
        med = {key: statistics.median(v) for key, v in samples.items()}
        p10 = {key: statistics.quantiles(v, n=10)[0] if len(v) > 1 else v[0] for key, v in samples.items()}
        rows.append({"n": n_out, "k": k, "dtype": str(dtype).removeprefix("torch."), "m": m,
                     "weight_bytes": nbytes, "copies": copies, "calls": {key: len(v) for key, v in samples.items()},
                     "us": {key: s * 1e6 for key, s in med.items()}, "us_p10": {key: s * 1e6 for key, s in p10.items()},
                     "gbs": {key: nbytes / s / 1e9 for key, s in med.items()},
                     "gbs_p10": {key: nbytes / s / 1e9 for key, s in p10.items()}})
    return rows


def step_summary(rows: list[dict], models: list[str], bandwidth: float) -> list[dict]:
    """Per model, dtype, M and method: the listed linears' bytes over their summed time, each linear
    weighted by how often a decode step reads it (per layer, lm_head once); from medians and 10th percentiles."""
    out = []
    for model in models:
        layers, _ = MODELS[model]
        mine = [r for r in rows if r["model"] == model]
        for dtype in dict.fromkeys(r["dtype"] for r in mine):
            for m in dict.fromkeys(r["m"] for r in mine):
                case = [r for r in mine if r["dtype"] == dtype and r["m"] == m]
                reps = {r["layer"]: 1 if r["layer"] == "lm_head" else layers for r in case}
                nbytes = sum(r["weight_bytes"] * reps[r["layer"]] for r in case)
                step = {"model": model, "dtype": dtype, "m": m, "step_weight_bytes": nbytes}
                for stat in ("us", "us_p10"):  # bytes / (us * 1e3) = GB/s
                    gbs = {key: nbytes / sum(r[stat][key] * 1e3 * reps[r["layer"]] for r in case)
                           for key in case[0][stat]}
                    sfx = stat.removeprefix("us")
                    step["gbs" + sfx] = gbs
                    step["roofline_fraction" + sfx] = {key: v / bandwidth for key, v in gbs.items()}
                out.append(step)
    return out


def markdown(rows: list[dict], steps: list[dict], bandwidth: float) -> str:
    """Per linear and M: each method's median GB/s (10th percentile in brackets); then per decode step."""
    keys = list(dict.fromkeys(k for r in rows for k in r["gbs"]))  # oneDNN only where it runs the dtype
    head = ["model", "linear", "N x K", "dtype", "M", *[f"{k} GB/s" for k in keys], "gemv/roof", "gemv/torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g, q = r["gbs"], r["gbs_p10"]
        lines.append("| " + " | ".join([r["model"], r["layer"], f"{r['n']} x {r['k']}", r["dtype"], str(r["m"]),
                                        *[f"{g[k]:.1f} ({q[k]:.1f})" if k in g else "-" for k in keys],
                                        f"{g['gemv'] / bandwidth:.2f} ({q['gemv'] / bandwidth:.2f})",
                                        f"{g['gemv'] / g['torch']:.2f}x"]) + " |")
    lines += ["", "Per decode step (listed linears weighted by layer count), GB/s and fraction of the roofline, "
              "from medians (10th percentiles):", "",
              "| model | dtype | M | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for s in steps:
        cells = [f"{s['gbs'][k]:.1f} = {s['roofline_fraction'][k]:.2f} ({s['gbs_p10'][k]:.1f} = "
                 f"{s['roofline_fraction_p10'][k]:.2f})" if k in s["gbs"] else "-" for k in keys]
        lines.append(f"| {s['model']} | {s['dtype']} | {s['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per case (after one warm-up round)")
    ap.add_argument("--budget-ms", type=float, default=30.0, help="minimum time per method per round")
    ap.add_argument("--cold-mib", type=int, default=128, help="weight copies per shape add up to at least this")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="before each shape, wait up to this many seconds for the CPUs to be 90%% idle")
    ap.add_argument("--variant", nargs="*", default=[],
                    help="extra builds to compare, NAME=-DX=1,-DY=2 (the tile macros of linear.cpp)")
    ap.add_argument("--out", default="bench_out/gemv.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ops = {"gemv": build("gemv", [], Path(tmp) / "gemv")}
        for spec in a.variant:
            name, _, defines = spec.partition("=")
            ops[name] = build(name, [d for d in defines.split(",") if d], Path(tmp) / name)
    onednn = {d: onednn_problem(DTYPES[d]) for d in a.dtype}
    load_before = os.getloadavg()
    bw_before = read_bandwidth()
    print(f"read bandwidth {bw_before:.1f} GB/s; torch threads {torch.get_num_threads()}; "
          f"oneDNN packed: {', '.join(f'{d}: ' + (p or 'ok') for d, p in onednn.items())}", flush=True)
    rows = []
    for model in a.models:
        for dtype in a.dtype:
            for layer, (n_out, k) in MODELS[model][1].items():
                idle = wait_quiet(a.quiet_wait) if a.quiet_wait else None
                for r in bench_shape(n_out, k, DTYPES[dtype], a.m, ops, onednn[dtype] is None, a.cold_mib << 20,
                                     a.repeats, a.budget_ms / 1e3):
                    rows.append({"model": model, "layer": layer, **r, "idle_before": idle})
                    print(f"{model:8} {layer:8} {n_out:6}x{k:<5} {dtype:9} M={r['m']:<3}"
                          + "  ".join(f"{key} {v:6.1f} ({r['gbs_p10'][key]:.1f})" for key, v in r["gbs"].items()),
                          flush=True)
    bw_after = read_bandwidth()
    bandwidth = max(bw_before, bw_after)  # the roofline: the better of two best-of-5 reads
    steps = step_summary(rows, a.models, bandwidth)
    # the fastest single-row stream seen (10th percentile, any method): a second, empirical roofline where
    # a kernel reads faster than torch's sum does
    streamed = max((v for r in rows if r["m"] == 1 for v in r["gbs_p10"].values()), default=0.0)
    print(f"\nread bandwidth: {bw_before:.1f} GB/s before, {bw_after:.1f} after; roofline {bandwidth:.1f}; "
          f"fastest M=1 stream seen {streamed:.1f}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (other processes share the CPUs)\n")
    print(markdown(rows, steps, bandwidth))
    write_json(a.out, {"config": {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                                  "cold_mib": a.cold_mib, "loadavg_before": load_before,
                                  "loadavg_after": os.getloadavg(), "repeats": a.repeats, "variants": a.variant,
                                  "onednn": {d: p or "ok" for d, p in onednn.items()}},
                       "read_bandwidth_gbs": {"before": bw_before, "after": bw_after, "roofline": bandwidth,
                                              "fastest_m1_stream_p10": streamed},
                       "rows": rows, "steps": steps})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
