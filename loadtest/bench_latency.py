"""Latency of AttnRes vs a standard residual model of the same shape, through the real engine.

Random weights (speed does not depend on them). Runs are interleaved A B A B ... and medians are
compared per pair, since this machine is noisy. Prints a Markdown table and writes JSON.

    python -m loadtest.bench_latency --layers 12 --hidden 512 --dtype bfloat16 --out bench_out/latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine import LLMEngine, SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig, parse_dtype
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.reference import ReferenceLlama


def write_random(folder: Path, cfg: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = ReferenceLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0, 0.1)
            elif not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    return save_checkpoint(model.state_dict(), cfg, folder, dtype=torch.bfloat16)


def make_engine(folder: Path, dtype: torch.dtype, max_len: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(folder), dtype=dtype,
                                  cache=CacheConfig(kv_cache_memory=2 << 30, depth_cache_memory=1 << 30),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096,
                                                            max_model_len=max_len)))


def time_prefill(eng: LLMEngine, n_tokens: int) -> float:
    ids = torch.randint(3, eng.model_config.vocab_size, (n_tokens,)).tolist()
    eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, ignore_eos=True))
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return time.perf_counter() - t


def time_decode(eng: LLMEngine, batch: int, steps: int, ctx: int = 64) -> float:
    """Median time of one decode step with `batch` sequences of ~ctx tokens."""
    for _ in range(batch):
        ids = torch.randint(3, eng.model_config.vocab_size, (ctx,)).tolist()
        eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    eng.step()  # prefill all
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:-1] or times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=8, help="N: number of AttnRes blocks (0: Full AttnRes)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out/latency.json")
    a = ap.parse_args(argv)
    dtype = parse_dtype(a.dtype)
    max_len = max(a.prefill) + 64
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max_len,
                  tie_word_embeddings=True)
    bs = max(1, -(-a.layers // a.blocks)) if a.blocks else 0
    cfg_ar = ModelConfig(**common, attn_res_mode="block" if a.blocks else "full", attn_res_block_size=bs)
    cfg_std = ModelConfig(**common)
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"standard": make_engine(write_random(Path(tmp) / "std", cfg_std), dtype, max_len),
                   "attnres": make_engine(write_random(Path(tmp) / "ar", cfg_ar), dtype, max_len)}
        rows = []
        cases = [("prefill", n) for n in a.prefill] + [("decode", b) for b in a.batch]
        for kind, n in cases:
            samples: dict[str, list[float]] = {"standard": [], "attnres": []}
            for _ in range(a.repeats):
                for name, eng in engines.items():  # interleaved A B A B
                    samples[name].append(time_prefill(eng, n) if kind == "prefill" else time_decode(eng, n, 16))
            std, ar = statistics.median(samples["standard"]), statistics.median(samples["attnres"])
            rows.append({"case": f"{kind} {'tokens' if kind == 'prefill' else 'batch'}={n}", "standard_ms": std * 1e3,
                         "attnres_ms": ar * 1e3, "overhead_pct": (ar / std - 1) * 100})
        depth_bytes = engines["attnres"].depth.spec.bytes_per_token if engines["attnres"].depth else 0
    result = {"config": {**common, "attn_res_block_size": bs, "blocks": a.blocks, "dtype": a.dtype,
                         "threads": torch.get_num_threads()},
              "depth_cache_bytes_per_token": depth_bytes, "rows": rows}
    print(f"| case | standard ms | AttnRes (N={a.blocks or 'full'}) ms | overhead |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['standard_ms']:.2f} | {r['attnres_ms']:.2f} | {r['overhead_pct']:+.1f}% |")
    print(f"depth cache bytes per in-flight token: {depth_bytes}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
