"""Latency of AttnRes vs a standard residual model of the same shape, through the real engine.

Random weights (speed does not depend on them). Runs are interleaved A B A B ... and medians are
compared per pair, since this machine is noisy. Prints a Markdown table and writes JSON.

    depthserve bench latency --layers 12 --hidden 512 --dtype bfloat16 --out bench_out/latency.json

With `--kernels native reference` it times each model on each op backend instead (four engines per dtype,
interleaved), and `--dtype` may name several dtypes, run one after the other. With `--model A --baseline B`
it times those checkpoints instead, on text (loadtest/bench_models.py).
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
from engine.arg_utils import EngineArgs, FriendlyParser
from engine.config import parse_dtype
from kernels import hugepages
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.reference import ReferenceLlama


def write_random(folder: Path, cfg: ModelConfig, device: str = "cpu") -> Path:
    """A random bf16 checkpoint; `device` only speeds up drawing the weights (big shapes on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ReferenceLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0, 0.1)
            elif not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    return save_checkpoint(model.state_dict(), cfg, folder, dtype=torch.bfloat16)


def make_engine(folder: Path, dtype: torch.dtype, max_len: int, device: str = "cpu",
                max_num_seqs: int = 64, kernels: str = "auto") -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(folder), dtype=dtype, kv_cache_memory="2GiB", depth_cache_memory="1GiB",
                                max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                                max_model_len=max_len, device=device, kernels=kernels).create_engine_config())


def sync(eng: LLMEngine) -> None:
    """Wait for the engine's device (each step already ends with its sampled ids on the host)."""
    if eng.config.device == "cuda":
        torch.cuda.synchronize()


def time_prefill(eng: LLMEngine, n_tokens: int) -> float:
    ids = torch.randint(3, eng.model_config.vocab_size, (n_tokens,)).tolist()
    eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, ignore_eos=True))
    sync(eng)
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    sync(eng)
    return time.perf_counter() - t


def time_decode(eng: LLMEngine, batch: int, steps: int, ctx: int = 64, depth_attention: bool = False) -> float:
    """Median time of one decode step with `batch` sequences of ~ctx tokens."""
    for _ in range(batch):
        ids = torch.randint(3, eng.model_config.vocab_size, (ctx,)).tolist()
        eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=steps + 2, ignore_eos=True,
                                                                  depth_attention=depth_attention))
    eng.step()  # prefill all
    times = []
    while eng.has_unfinished_requests():
        sync(eng)
        t = time.perf_counter()
        eng.step()
        sync(eng)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:-1] or times)


def model_shape(layers: int = 12, hidden: int = 512, heads: int = 8, kv_heads: int = 4, ffn: int = 1408,
                vocab: int = 8192, max_len: int = 2112) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                tie_word_embeddings=True)


def model_pair(shape: dict, blocks: int) -> tuple[dict[str, ModelConfig], int]:
    """The standard model of `shape` and its AttnRes twin (N=`blocks` blocks, 0: Full), and the block size."""
    bs = max(1, -(-shape["num_hidden_layers"] // blocks)) if blocks else 0
    return {"standard": ModelConfig(**shape),
            "attnres": ModelConfig(**shape, attn_res_mode="block" if blocks else "full", attn_res_block_size=bs)}, bs


def interleaved(engines: dict, prefill: list[int], batch: list[int], repeats: int,
                steps: int) -> list[tuple[str, int, dict]]:
    """Per case (kind, n), each engine's median seconds; engines run in turn (A B A B), the first round warms up."""
    rows = []
    for kind, n in [("prefill", n) for n in prefill] + [("decode", b) for b in batch]:
        samples: dict = {key: [] for key in engines}
        for rep in range(repeats + 1):
            for key, eng in engines.items():
                t = time_prefill(eng, n) if kind == "prefill" else time_decode(eng, n, steps)
                if rep:
                    samples[key].append(t)
        rows.append((kind, n, {key: statistics.median(v) for key, v in samples.items()}))
    return rows


def _case(kind: str, n: int) -> str:
    return f"{kind} {'tokens' if kind == 'prefill' else 'batch'}={n}"


def compare(shape: dict, blocks: int, dtype: str, prefill: list[int], batch: list[int], repeats: int = 3,
            device: str = "cpu", steps: int = 16) -> dict:
    """AttnRes (N=`blocks` blocks, 0: Full AttnRes) vs the standard model of `shape`, interleaved A B A B."""
    torch_dtype = parse_dtype(dtype)
    cfgs, bs = model_pair(shape, blocks)
    max_len = shape["max_position_embeddings"]
    with tempfile.TemporaryDirectory() as tmp:
        seqs = max(64, *batch)
        engines = {name: make_engine(write_random(Path(tmp) / name, cfg, device), torch_dtype, max_len, device, seqs)
                   for name, cfg in cfgs.items()}
        rows = [{"kind": kind, "n": n, "case": _case(kind, n), "standard_ms": t["standard"] * 1e3,
                 "attnres_ms": t["attnres"] * 1e3, "overhead_pct": (t["attnres"] / t["standard"] - 1) * 100}
                for kind, n, t in interleaved(engines, prefill, batch, repeats, steps)]
        depth = engines["attnres"].depth
        depth_bytes = depth.spec.bytes_per_token if depth is not None else 0
    return {"config": {**shape, "attn_res_block_size": bs, "blocks": blocks,
                       "num_depth_blocks": cfgs["attnres"].num_depth_blocks,
                       "dtype": dtype, "threads": torch.get_num_threads(), "device": device},
            "depth_cache_bytes_per_token": depth_bytes, "rows": rows}


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth in GB/s, as torch sums a buffer far larger than the caches: the
    better of a buffer in ordinary pages and one in huge pages (the engine keeps its weights in huge pages where
    the kernel allows, kernels/hugepages.py, so the roofline must allow them too)."""
    best = 0.0
    for huge in (False, True):
        buf = torch.empty(mib << 18)  # fp32, not yet touched
        if huge:
            hugepages.advise([buf], collapse=False)
        buf.fill_(1.0)
        buf.sum()
        best = max(best, buf.numel() * 4 / min(_timed(buf.sum) for _ in range(repeats)) / 1e9)
    return best


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def compare_kernels(shape: dict, blocks: int, dtype: str, prefill: list[int], batch: list[int], repeats: int = 3,
                    kernels: tuple[str, ...] = ("native", "reference")) -> dict:
    """Standard and AttnRes models of `shape`, each on every backend in `kernels`: all engines interleaved."""
    torch_dtype = parse_dtype(dtype)
    cfgs, bs = model_pair(shape, blocks)
    max_len = shape["max_position_embeddings"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {m: write_random(Path(tmp) / m, cfg) for m, cfg in cfgs.items()}
        engines = {(m, k): make_engine(folders[m], torch_dtype, max_len, kernels=k) for m in cfgs for k in kernels}
        ran = {k: engines["standard", k].kernels.name for k in kernels}  # what each request resolved to
        rows = [{"kind": kind, "n": n, "case": _case(kind, n),
                 "ms": {f"{m}/{k}": sec * 1e3 for (m, k), sec in t.items()}}
                for kind, n, t in interleaved(engines, prefill, batch, repeats, 16)]
        del engines
    return {"config": {**shape, "attn_res_block_size": bs, "blocks": blocks, "dtype": dtype,
                       "threads": torch.get_num_threads(), "kernels": list(kernels), "resolved": ran},
            "rows": rows}


def markdown_kernels(result: dict) -> str:
    """One row per case: ms per model and backend, and each model's reference/native speed-up."""
    c = result["config"]
    ks, res = c["kernels"], c["resolved"]
    label = {k: k if res[k] == k else f"{k}->{res[k]}" for k in ks}
    head = [f"{m} {label[k]} ms" for m in ("standard", "attnres") for k in ks]
    speed = len(ks) == 2
    if speed:
        head += [f"standard {ks[1]}/{ks[0]}", f"attnres {ks[1]}/{ks[0]}"]
    lines = [f"| {c['dtype']} case | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in result["rows"]:
        ms = r["ms"]
        cells = [f"{ms[f'{m}/{k}']:.2f}" for m in ("standard", "attnres") for k in ks]
        if speed:
            cells += [f"{ms[f'{m}/{ks[1]}'] / ms[f'{m}/{ks[0]}']:.2f}x" for m in ("standard", "attnres")]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    c = result["config"]
    label = f"N={c['num_depth_blocks']}" if c["blocks"] else "Full"
    lines = [f"| case | standard ms | AttnRes ({label}) ms | overhead |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['standard_ms']:.2f} | {r['attnres_ms']:.2f} | {r['overhead_pct']:+.1f}% |"
              for r in result["rows"]]
    return "\n".join(lines)


def write_json(path: str | Path, obj: object) -> None:
    """Write a benchmark's figures (creating the folder), so every tool leaves the same kind of file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model-shape flags shared by the offline benchmarks (defaults: a 12-layer d=512 model)."""
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)


def depth_attention_cost(shape: dict, blocks: int, dtype: str, batch: int, repeats: int = 3) -> dict:
    """Decode step time of an AttnRes model with no request asking for depth weights vs all asking."""
    cfg = model_pair(shape, blocks)[0]["attnres"]
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(write_random(Path(tmp) / "ar", cfg), parse_dtype(dtype), shape["max_position_embeddings"])
        samples: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(repeats + 1):
            for asking in (False, True):
                t = time_decode(eng, batch, 16, depth_attention=asking)
                if rep:
                    samples[asking].append(t)
    off, on = statistics.median(samples[False]) * 1e3, statistics.median(samples[True]) * 1e3
    return {"batch": batch, "no_request_asking_ms": off, "all_asking_ms": on, "cost_when_asked_pct": (on / off - 1) * 100}


def main(argv: list[str] | None = None) -> int:
    ap = FriendlyParser(prog="depthserve bench latency", description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--blocks", type=int, default=8, help="N: number of AttnRes blocks (0: Full AttnRes)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], help="one or more dtypes, run one after the other")
    ap.add_argument("--kernels", nargs="+", choices=["auto", "native", "reference"], default=None,
                    help="op backends to compare on each model (e.g. native reference); default: one engine per "
                         "model on auto")
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out/latency.json")
    from loadtest import bench_models

    bench_models.add_model_args(ap)
    a = ap.parse_args(argv)
    if a.model or a.baseline or a.speculative_config:
        return bench_models.latency_main(a)
    shape = model_shape(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, max(*a.prefill, 128) + 64)
    if a.kernels:
        results = {"read_bandwidth_gbs": read_bandwidth(), "runs": []}
        print(f"memory read bandwidth: {results['read_bandwidth_gbs']:.1f} GB/s; torch threads: "
              f"{torch.get_num_threads()}")
        for dtype in a.dtype:
            result = compare_kernels(shape, a.blocks, dtype, a.prefill, a.batch, a.repeats, tuple(a.kernels))
            print(markdown_kernels(result))
            results["runs"].append(result)
        write_json(a.out, results)
        return 0
    results = []
    for dtype in a.dtype:
        result = compare(shape, a.blocks, dtype, a.prefill, a.batch, a.repeats)
        print(markdown(result))
        print(f"depth cache bytes per in-flight token: {result['depth_cache_bytes_per_token']}")
        results.append(result)
    write_json(a.out, results[0] if len(results) == 1 else results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
