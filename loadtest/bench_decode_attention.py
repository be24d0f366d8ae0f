"""Decode attention per call: the reference (index_select gather + SDPA) vs the native op that reads K/V
blocks in place (kernels/csrc/decode_attention.cpp), at SmolLM2's attention shape.

Random data on scattered KV blocks, metadata built as engine/model_runner.py builds it. Calls are
interleaved reference / native and the median of each is reported. Prints a Markdown table and writes JSON.
By default every call reads the same cache, which then sits in L2/L3; `--layers N` gives N caches read in
turn, as a decode step's layers are (30 layers of a 2048-token context do not stay in L3: the reads then come
from DRAM, as in serving).

    python -m loadtest.bench_decode_attention --out bench_out/decode_attention.json
    python -m loadtest.bench_decode_attention --batch 1 --context 2048 --dtype bfloat16 --threads 1
    python -m loadtest.bench_decode_attention --batch 1 --context 512 2048 --layers 30

Until the shared extension loader exists, the op is compiled here from its source (--build-dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kernels import cpu_attention, reference
from models.context import AttentionMetadata


def decode_meta(batch: int, context: int, block_size: int, num_blocks: int, seed: int = 0) -> AttentionMetadata:
    """`batch` decode rows of `context` tokens each on distinct random blocks; both views of the context."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-context // block_size)
    table = torch.randperm(num_blocks, generator=g)[: batch * nb].view(batch, nb)
    lens = torch.full((batch,), context, dtype=torch.long)
    gather = (table.unsqueeze(-1) * block_size + torch.arange(block_size)).reshape(batch, -1)[:, :context]
    mask = (torch.arange(context).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
    return AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decode=batch, block_size=block_size,
                             decode_block_table=table, decode_context_lens=lens.to(torch.int32),
                             decode_gather=gather, decode_mask=mask)


def bench_one(batch: int, context: int, dtype: torch.dtype, heads: int, kv: int, hd: int, block_size: int,
              min_seconds: float, layers: int = 1) -> dict:
    nb = -(-context // block_size)
    num_blocks = batch * nb + nb  # a few spare blocks, so the rows' blocks are scattered
    meta = decode_meta(batch, context, block_size, num_blocks)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, hd, generator=g).to(dtype)
    caches = [(torch.randn(num_blocks * block_size, kv, hd, generator=g).to(dtype),
               torch.randn(num_blocks * block_size, kv, hd, generator=g).to(dtype)) for _ in range(layers)]
    k, v = caches[0]
    scale = hd ** -0.5
    fns = {"reference": reference.decode_attention, "native": cpu_attention.native_decode_attention}
    outs = {name: f(q, k, v, meta, scale) for name, f in fns.items()}  # warm-up
    err = (outs["native"].float() - outs["reference"].float()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < min_seconds or len(times["native"]) < 5:
        for i, (name, f) in enumerate(fns.items()):
            k, v = caches[(calls + i * (layers // 2)) % layers]  # apart: neither reads what the other just did
            t = time.perf_counter()
            f(q, k, v, meta, scale)
            times[name].append(time.perf_counter() - t)
        calls += 1
    ref_us, nat_us = (statistics.median(times[n]) * 1e6 for n in ("reference", "native"))
    return {"batch": batch, "context": context, "dtype": str(dtype).removeprefix("torch."), "layers": layers,
            "reference_us": ref_us,
            "native_us": nat_us, "speedup": ref_us / nat_us, "max_abs_diff": err, "calls": len(times["native"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--layers", type=int, default=1, help="caches read in turn (1: one cache, hot in L2/L3)")
    ap.add_argument("--min-seconds", type=float, default=0.3, help="timing time per case and implementation")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu_attention.ensure_loaded()  # the native library (kernels/cpu_ext.py), built once and cached
    rows = []
    print(f"decode attention per call, H {a.heads} KV {a.kv_heads} hd {a.head_dim} block {a.block_size}, "
          f"{torch.get_num_threads()} threads, {a.layers} cache(s) in turn\n")
    print("| dtype | batch | context | reference µs | native µs | speedup | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for dtype in a.dtype:
            for batch in a.batch:
                for context in a.context:
                    r = bench_one(batch, context, getattr(torch, dtype), a.heads, a.kv_heads, a.head_dim,
                                  a.block_size, a.min_seconds, a.layers)
                    rows.append(r)
                    print(f"| {r['dtype']} | {batch} | {context} | {r['reference_us']:.1f} | {r['native_us']:.1f} | "
                          f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        cfg = {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "block_size": a.block_size,
               "threads": torch.get_num_threads(), "layers": a.layers}
        a.out.write_text(json.dumps({"config": cfg, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
