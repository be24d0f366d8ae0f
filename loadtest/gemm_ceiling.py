"""The compute ceiling of batched decode on this CPU: GFLOP/s of one decode step's linears at M rows.

At large decode batches a step is bound by its linears' FLOPs, not by memory. This times the linears of one
decode step of a model shape (per layer q/k/v, o, gate/up, down; the LM head on up to 128 rows) at each M, with
torch's F.linear (MKL) and with oneDNN on weights prepacked as the engine packs them, and prints the best
tokens/s any engine could reach at that batch if the step did nothing else.

    python -m loadtest.gemm_ceiling --m 32 64 128 256 --out bench_out/gemm_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import cpu


def _ms(f, reps: int) -> float:
    f()
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def step_linears(hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> list[tuple[int, int, int]]:
    """(out, in, count) of one decode step's linears (LM head once)."""
    hd = hidden // heads
    return [((heads + 2 * kv_heads) * hd, hidden, 1), (hidden, heads * hd, 1), (2 * ffn, hidden, 1),
            (hidden, ffn, 1), (vocab, hidden, 0)]


def measure(m_values: list[int], layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
            reps: int) -> list[dict]:
    rows = []
    for m in m_values:
        total = {"F.linear": 0.0, "oneDNN packed": 0.0}
        flops = 0
        for out_f, in_f, per_layer in step_linears(hidden, heads, kv_heads, ffn, vocab):
            w = torch.randn(out_f, in_f)
            x = torch.randn(min(m, 128) if per_layer == 0 else m, in_f)
            mult = layers if per_layer else 1
            packed = cpu.pack_linear(w) if cpu.available() else None
            total["F.linear"] += _ms(lambda x=x, w=w: F.linear(x, w), reps) * mult
            if packed is not None:
                total["oneDNN packed"] += _ms(lambda x=x, p=packed: cpu.linear(x, p), reps) * mult
            flops += 2 * x.shape[0] * out_f * in_f * mult
        best = min(v for v in total.values() if v > 0)
        rows.append({"m": m, "step_gflop": flops / 1e9, "ms": total,
                     "gflops": {k: flops / v / 1e6 for k, v in total.items() if v > 0},
                     "ceiling_tok_s": m / best * 1e3})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[32, 64, 128, 256], help="decode batch sizes (rows)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench_out/gemm_ceiling.json"))
    a = ap.parse_args(argv)
    rows = measure(a.m, a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, a.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print("| M | step GFLOP | F.linear ms (GF/s) | oneDNN packed ms (GF/s) | ceiling tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['ms'][k]:.1f} ({r['gflops'][k]:.0f})" if k in r["gflops"] else "n/a"
                 for k in ("F.linear", "oneDNN packed")]
        print(f"| {r['m']} | {r['step_gflop']:.1f} | {cells[0]} | {cells[1]} | {r['ceiling_tok_s']:.0f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
