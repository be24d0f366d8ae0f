"""Offline throughput: depthserve vs Hugging Face transformers `generate()` on the same weights.

N prompts with random input/output lengths (ignore_eos), run through `LLM.generate` with continuous
batching, then through `model.generate()` in static batches at several batch sizes (its best is
reported). Also measures, in the same run, the memory-bandwidth roofline of batch-1 decode
(weight bytes per step / measured copy bandwidth) and where a batch-32 decode step's time goes.

    depthserve bench throughput --num-prompts 64 --out bench_out/throughput.json

With `--model A --baseline B` it runs the same requests through those checkpoints instead, in turn, and
compares their throughput and per-request TTFT/TPOT (loadtest/bench_models.py).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.arg_utils import FriendlyParser
from engine.config import parse_dtype
from kernels import hugepages
from loadtest.bench_latency import (
    add_shape_args,
    make_engine,
    model_shape,
    read_bandwidth,
    write_json,
    write_random,
)
from models.config import ModelConfig


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s of a large tensor copy (read + write counted), the decode roofline's denominator; on CUDA a
    device-to-device copy timed with CUDA events. On a CPU the better of ordinary and huge pages (the engine's
    weights sit in huge pages where the kernel allows: kernels/hugepages.py)."""
    if device == "cpu":
        return max(_copy_bandwidth(nbytes, repeats, device, huge) for huge in (False, True))
    return _copy_bandwidth(nbytes, repeats, device, False)


def _copy_bandwidth(nbytes: int, repeats: int, device: str, huge: bool) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if huge:
        hugepages.advise([src, dst], collapse=False)  # before the first touch
    src.uniform_()
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes(eng: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in eng.model.parameters())


def decode_profile(eng: LLMEngine, batch: int, steps: int = 12) -> dict[str, float]:
    """Median ms per decode step, split into the model (forward + LM head) and everything else
    (scheduling, batch building, sampling, detokenisation, stop checks)."""
    for _ in range(batch):
        ids = torch.randint(3, eng.model_config.vocab_size, (64,)).tolist()
        eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0.8))
    eng.step()
    model = eng.runner.model
    parts: dict[str, list[float]] = {"total": [], "forward": []}
    forward, logits = model.forward, model.compute_logits
    acc = [0.0]

    def timed(fn):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            out = fn(*args)
            acc[0] += time.perf_counter() - t
            return out
        return run

    model.forward, model.compute_logits = timed(forward), timed(logits)  # type: ignore[method-assign]
    try:
        while eng.has_unfinished_requests():
            acc[0] = 0.0
            t = time.perf_counter()
            eng.step()
            parts["total"].append(time.perf_counter() - t)
            parts["forward"].append(acc[0])
    finally:
        del model.forward, model.compute_logits
    total = statistics.median(parts["total"][1:-1])
    fwd = statistics.median(parts["forward"][1:-1])
    return {"step_ms": total * 1e3, "forward_ms": fwd * 1e3, "overhead_ms": (total - fwd) * 1e3,
            "overhead_pct": (total - fwd) / total * 100}


def run_depthserve(folder: Path, dtype: str, prompts: list[list[int]], outs: list[int], max_len: int,
                   device: str = "cpu", max_num_seqs: int = 32) -> float:
    llm = LLM(str(folder), dtype=dtype, max_model_len=max_len, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=2048, device=device)
    params = [SamplingParams(temperature=0.8, max_tokens=o, ignore_eos=True, seed=i) for i, o in enumerate(outs)]
    llm.generate({"prompt_token_ids": prompts[0]}, params[0])  # warm-up
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t
    assert sum(len(r.outputs[0].token_ids) for r in res) == sum(outs)
    return sum(outs) / dt


def run_hf(folder: Path, dtype: str, prompts: list[list[int]], outs: list[int], batch: int,
           device: str = "cpu") -> float:
    """Static batches, left-padded; every sequence of a batch decodes to the batch's longest output."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=parse_dtype(dtype)).eval().to(device)
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i:i + batch], outs[i:i + batch]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=0,
                           max_new_tokens=max(os_), min_new_tokens=max(os_), pad_token_id=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(outs) / (time.perf_counter() - t)


def decode_rate_depthserve(folder: Path, dtype: str, batches: list[int], ctx: int, steps: int,
                           max_len: int) -> dict[int, float]:
    """Output tok/s of pure decode steps at each batch size (`ctx`-token prompts, median step)."""
    from loadtest.bench_latency import time_decode

    eng = make_engine(folder, parse_dtype(dtype), max_len, max_num_seqs=max(batches))
    time_decode(eng, 1, 4, ctx)  # warm-up
    return {b: b / time_decode(eng, b, steps, ctx) for b in batches}


def decode_rate_hf(folder: Path, dtype: str, batches: list[int], ctx: int, steps: int, vocab: int,
                   repeats: int = 2) -> dict[int, float]:
    """transformers' decode tok/s at each batch: (generate steps+1 tokens) - (generate 1 token), best of
    `repeats`, sampling at temperature 0.8 as depthserve does."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=parse_dtype(dtype)).eval()

    def gen(ids: torch.Tensor, n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8,
                           top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - t

    out = {}
    for b in batches:
        ids = torch.randint(3, vocab, (b, ctx))
        gen(ids, 2)  # warm-up
        best = min(gen(ids, steps + 1) - gen(ids, 1) for _ in range(repeats))
        out[b] = b * steps / best
    return out


def prefill_vs_hf(folder: Path, dtype: str, n_tokens: int, max_len: int, repeats: int = 3) -> dict:
    """Time to first token of one `n_tokens` prompt through the engine vs transformers' single forward of the
    same ids (no generate() overhead), interleaved; medians in ms."""
    from transformers import LlamaForCausalLM

    from loadtest.bench_latency import time_prefill

    eng = make_engine(folder, parse_dtype(dtype), max_len)
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=parse_dtype(dtype)).eval()
    ids = torch.randint(3, eng.model_config.vocab_size, (1, n_tokens))
    ds_t, hf_t = [], []
    for rep in range(repeats + 1):
        t_ds = time_prefill(eng, n_tokens)
        t = time.perf_counter()
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        t_hf = time.perf_counter() - t
        if rep:
            ds_t.append(t_ds)
            hf_t.append(t_hf)
    ds_ms, hf_ms = statistics.median(ds_t) * 1e3, statistics.median(hf_t) * 1e3
    return {"tokens": n_tokens, "depthserve_ttft_ms": ds_ms, "hf_forward_ms": hf_ms, "ratio": ds_ms / hf_ms}


def main(argv: list[str] | None = None) -> int:
    ap = FriendlyParser(prog="depthserve bench throughput", description=__doc__)
    add_shape_args(ap)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--hf-batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=[32, 128],
                    help="depthserve batch caps to run (its best is compared; 32 is reported too)")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="TTFT vs transformers' forward (0: skip)")
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8, 32, 64, 128],
                    help="batches of the pure decode rate (transformers runs those in --hf-batch and <= 64)")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps per decode-rate case (0: skip)")
    ap.add_argument("--out", default="bench_out/throughput.json")
    ap.add_argument("--repeats", type=int, default=2, help="with --model/--baseline: timed rounds (A B) after "
                                                            "a warm-up round")
    ap.add_argument("--seed", type=int, default=0, help="with --model/--baseline: seed of the request lengths")
    from loadtest import bench_models

    bench_models.add_model_args(ap)
    a = ap.parse_args(argv)
    if a.model or a.baseline or a.speculative_config:
        return bench_models.throughput_main(a)
    rng = random.Random(0)
    max_len = max(a.input_len[1] + a.output_len[1] + 8, 128, a.prefill_tokens + 8,
                  64 + a.decode_steps + 8)  # decode_profile and the decode rate: 64-token prompts
    cfg = ModelConfig(**model_shape(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, max_len))
    prompts = [[rng.randrange(3, a.vocab) for _ in range(rng.randint(*a.input_len))] for _ in range(a.num_prompts)]
    outs = [rng.randint(*a.output_len) for _ in range(a.num_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random(Path(tmp) / "std", cfg)
        ds_all = {m: run_depthserve(folder, a.dtype, prompts, outs, max_len, max_num_seqs=m) for m in a.max_num_seqs}
        hf = {b: run_hf(folder, a.dtype, prompts, outs, b) for b in a.hf_batch}
        eng = make_engine(folder, parse_dtype(a.dtype), max_len)
        bw = copy_bandwidth()
        read_bw = read_bandwidth() * 1e9
        wbytes = weight_bytes(eng)
        b1 = decode_profile(eng, 1)
        b32 = decode_profile(eng, 32)
        del eng
        prefill = prefill_vs_hf(folder, a.dtype, a.prefill_tokens, max_len) if a.prefill_tokens else None
        rate = None
        if a.decode_steps:
            ctx = 64
            hf_b = [b for b in a.decode_batch if b <= 64 and b in a.hf_batch] or [b for b in a.decode_batch if b <= 64]
            ds_rate = decode_rate_depthserve(folder, a.dtype, a.decode_batch, ctx, a.decode_steps, max_len)
            hf_rate = decode_rate_hf(folder, a.dtype, hf_b, ctx, a.decode_steps, a.vocab)
            rb, hb = max(ds_rate, key=ds_rate.get), max(hf_rate, key=hf_rate.get)
            rate = {"ctx": ctx, "steps": a.decode_steps, "depthserve_tok_s": ds_rate, "hf_tok_s": hf_rate,
                    "depthserve_best_batch": rb, "hf_best_batch": hb,
                    "speedup_best_vs_best": ds_rate[rb] / hf_rate[hb],
                    "speedup_b32": ds_rate[32] / hf_rate[32] if 32 in ds_rate and 32 in hf_rate else None}
    roofline_ms = wbytes / bw * 1e3
    read_roofline_ms = wbytes / read_bw * 1e3
    best_b = max(hf, key=hf.get)
    best_m = max(ds_all, key=ds_all.get)
    ds = ds_all[best_m]
    result = {
        "config": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn,
                   "vocab": a.vocab, "dtype": a.dtype, "num_prompts": a.num_prompts, "input_len": a.input_len,
                   "output_len": a.output_len, "threads": torch.get_num_threads()},
        "depthserve_tok_s": ds, "depthserve_best_max_num_seqs": best_m,
        "depthserve_tok_s_by_max_num_seqs": ds_all, "hf_tok_s": hf, "hf_best_batch": best_b,
        "speedup_vs_hf_best": ds / hf[best_b],
        "copy_bandwidth_gb_s": bw / 1e9, "read_bandwidth_gb_s": read_bw / 1e9, "weight_mb": wbytes / 1e6,
        "roofline_step_ms": roofline_ms, "read_roofline_step_ms": read_roofline_ms,
        "decode_b1": b1, "decode_b32": b32, "b1_fraction_of_roofline": roofline_ms / b1["step_ms"],
        "b1_fraction_of_read_roofline": read_roofline_ms / b1["step_ms"], "prefill_vs_hf": prefill,
        "decode_rate": rate,
    }
    print(f"depthserve (best cap {best_m} sequences): {ds:.1f} tok/s | transformers generate best (batch {best_b}): "
          f"{hf[best_b]:.1f} tok/s | speed-up {ds / hf[best_b]:.2f}x  (depthserve by cap: "
          + ", ".join(f"{m}: {v:.1f}" for m, v in ds_all.items()) + "; HF by batch: "
          + ", ".join(f"{b}: {v:.1f}" for b, v in hf.items()) + ")")
    print(f"batch-1 decode {b1['step_ms']:.2f} ms/step vs roofline {roofline_ms:.2f} ms at copy bandwidth "
          f"{bw / 1e9:.1f} GB/s ({roofline_ms / b1['step_ms'] * 100:.0f}%), {read_roofline_ms:.2f} ms at read "
          f"bandwidth {read_bw / 1e9:.1f} GB/s ({read_roofline_ms / b1['step_ms'] * 100:.0f}%); {wbytes / 1e6:.0f} MB "
          "of weights")
    if prefill:
        print(f"{prefill['tokens']}-token prompt: depthserve TTFT {prefill['depthserve_ttft_ms']:.0f} ms, "
              f"transformers forward {prefill['hf_forward_ms']:.0f} ms ({prefill['ratio']:.2f}x)")
    print(f"batch-32 decode {b32['step_ms']:.2f} ms/step, of which outside the model (scheduler, batch, sampler) "
          f"{b32['overhead_ms']:.2f} ms ({b32['overhead_pct']:.1f}%)")
    if rate:
        print(f"decode rate ({rate['ctx']}-token prompts, {rate['steps']} steps): depthserve best {rate['depthserve_best_batch']}"
              f" sequences {rate['depthserve_tok_s'][rate['depthserve_best_batch']]:.1f} tok/s vs transformers best "
              f"(batch {rate['hf_best_batch']}) {rate['hf_tok_s'][rate['hf_best_batch']]:.1f} tok/s: "
              f"{rate['speedup_best_vs_best']:.2f}x (depthserve by batch: "
              + ", ".join(f"{b}: {v:.1f}" for b, v in rate["depthserve_tok_s"].items()) + "; HF by batch: "
              + ", ".join(f"{b}: {v:.1f}" for b, v in rate["hf_tok_s"].items()) + ")")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
