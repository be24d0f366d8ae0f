"""Device check: the engine on one GPU (eager and with CUDA graphs), against the reference, then benchmarks.

    PYTHONPATH=. python -m loadtest.device_check --out OUT            # on a CUDA machine, < 8 minutes
    PYTHONPATH=. python -m loadtest.device_check --out OUT --device cpu --quick   # the same script, tiny

Writes OUT/device_check.json (every check and figure) and OUT/RESULTS-gpu.md (a summary). Needs torch,
safetensors and sentencepiece only (no server packages); pytest and triton (part a2) and transformers (part c)
are optional.

a. correctness: greedy tokens of the engine (fp32) equal models/reference.py's full-recompute greedy on
   the same device, for std / Block (3 of 5 layers) / Full AttnRes, batched, with chunked prefill +
   prefix hits, with preemption, with one-token chunks; bf16 runs and the sampling paths give valid tokens.
   Each model in three modes: `eager` (--enforce-eager, the default kernels), `graphs(triton)` (kernels
   "triton": decode steps replayed as CUDA graphs) and `graphs(static-table)` (CUDA graphs around a plain
   PyTorch capture-safe decode attention, tests.tiny.STATIC_TABLE_OPS: the graph machinery alone). Graph
   modes must have captured graphs and replayed decode steps: the JSON records the captured sizes, the
   replays and the start-up `cudagraph` status. On the CPU the graph modes become `padded(static-table)`: the
   same padded static batch, run eagerly. (On CUDA the engine's `auto` kernels are the triton ones: each check
   names the backend that ran.)
a2. the triton kernels: tests/kernels/test_triton_ops.py (every op vs the reference, the engine on the triton
   backend) compiled on the GPU (TRITON_INTERPRET unset); with --device cpu, in triton's interpreter (--quick:
   a few of them). Needs pytest and triton; skipped with a NOTE when either is missing.
b. benchmarks (bf16, random weights): AttnRes (Block, N=8) vs standard residual at the SmolLM2-135M and
   Llama-3.2-1B shapes, interleaved, decode step latency at batch 1/32/128 and a 2,048-token prefill
   (loadtest.bench_latency.compare); batch-1 decode of the 1B shape as a fraction of the HBM roofline.
   GPU idle share of a batch-8 decode step (SmolLM2 shape, AttnRes), eager and with graphs: torch.profiler's
   summed GPU kernel time over the step's wall time (timed without the profiler).
c. optional: offline throughput vs transformers generate() when transformers is importable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

SERVER_ONLY = ("fastapi", "pydantic", "prometheus_client", "gguf", "transformers", "pytest")

# (mode, block size, layers): standard, a block size that does not divide the layers, Full AttnRes
CASES = [("none", 0, 4), ("block", 3, 5), ("full", 0, 4)]
# engine settings of tests/engine/test_engine_vs_reference.py: name -> (LLM keywords, what must have happened)
SETTINGS: dict[str, tuple[dict[str, Any], str | None]] = {
    "batched": ({}, None),
    "chunked_prefill_prefix_hits": ({"max_num_batched_tokens": 5, "block_size": 4}, "prefix_cache_hits"),
    "preemption": ({"block_size": 4, "num_kv_blocks": 16, "max_num_batched_tokens": 16}, "num_preemptions"),
    "one_token_chunks_no_prefix_cache": ({"max_num_batched_tokens": 3, "block_size": 2,
                                          "enable_prefix_caching": False}, None),
}
SHAPES = {  # SmolLM2-135M and Llama-3.2-1B (tied embeddings, head_dim 64)
    "smollm2-135m": dict(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152),
    "llama3.2-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=128256),
}
QUICK_SHAPES = {"tiny": dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=512)}
QUICK_SETTINGS = ("batched", "preemption")  # --quick: two of the engine settings
# engine-vs-reference modes: eager everywhere; graphs on CUDA (padded eager steps on the CPU)
MODES = ("eager", "graphs(triton)", "graphs(static-table)")
GRAPH_SETTINGS = ("batched", "preemption", "one_token_chunks_no_prefix_cache")  # graph modes: these settings
GRAPH_MAX_BATCH = 16  # graph modes capture sizes 1, 2, 4, 8, 16 (the prompts decode 4 at a time)
# The correctness engines get a byte budget: sized by --gpu-memory-utilization, each would take most of the GPU
# while the previous one is still being freed. check_gpu_memory_utilization covers that sizing on its own.
KV_BUDGET = "64MiB"


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            detail = fn()
            ok, err = True, None
        except Exception as e:  # noqa: BLE001 - every check reports, the script goes on
            detail, ok = None, False
            err = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        secs = time.perf_counter() - t
        self.checks.append({"name": name, "ok": ok, "seconds": round(secs, 2), "error": err,
                            "detail": detail if isinstance(detail, dict | list | str | int | float) else None})
        print(f"{'PASS' if ok else 'FAIL'} {name} ({secs:.1f}s){'' if ok else ': ' + str(err)}", flush=True)
        return detail


# ---- a. correctness --------------------------------------------------------------------------------------
def check_imports() -> dict:
    """engine / models import none of the server-only or optional packages (the GPU machine lacks them)."""
    import engine.llm_engine  # noqa: F401
    import models.llama  # noqa: F401
    import models.loader  # noqa: F401

    loaded = [m for m in SERVER_ONLY if m in sys.modules]
    assert not loaded, f"importing engine/models pulled in {loaded}"
    return {"not_imported": list(SERVER_ONLY)}


@contextlib.contextmanager
def kernel_override(mode: str) -> Iterator[None]:
    """`graphs(static-table)`: every engine built inside gets tests.tiny.STATIC_TABLE_OPS as its kernel set."""
    if mode != "graphs(static-table)":
        yield
        return
    import kernels.ops as ops
    from tests.tiny import STATIC_TABLE_OPS

    original = ops.kernel_set
    ops.kernel_set = lambda backend, device="cpu": STATIC_TABLE_OPS
    try:
        yield
    finally:
        ops.kernel_set = original


def mode_options(mode: str, device: str) -> dict[str, Any]:
    """LLM keywords of an engine-vs-reference mode."""
    if mode == "eager":
        return {"enforce_eager": True}
    opts: dict[str, Any] = {"max_cuda_graph_batch_size": GRAPH_MAX_BATCH}
    if mode == "graphs(triton)":
        from kernels.ops import BACKENDS

        if "triton" not in BACKENDS:
            raise RuntimeError(f"this build has no triton kernel backend (kernels: {', '.join(BACKENDS)})")
        opts["kernels"] = "triton"
    return opts


def mode_label(mode: str, device: str) -> str:
    return mode.replace("graphs", "padded") if device == "cpu" else mode


def check_engine_vs_reference(folder: Path, ref: torch.nn.Module, device: str, quick: bool = False,
                              mode: str = "eager") -> dict:
    from engine import LLM, SamplingParams
    from engine.cuda_graphs import capture_sizes
    from tests.tiny import MAX_TOKENS, PROMPTS, reference_greedy

    ref = ref.to(device)
    expected = [reference_greedy(ref, p, MAX_TOKENS, device=device) for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    graphs = mode != "eager"
    done: dict[str, Any] = {}
    for name, (kw, stat) in SETTINGS.items():
        if (quick and name not in QUICK_SETTINGS) or (graphs and name not in GRAPH_SETTINGS) or (
                quick and graphs and name != "preemption"):  # --quick: graph modes on the preemption run only
            continue
        with kernel_override(mode), LLM(str(folder), max_model_len=64, device=device, dtype="float32",
                                        kv_cache_memory=KV_BUDGET, **mode_options(mode, device), **kw) as llm:
            eng = llm.engine
            runner = eng.runner
            assert runner.kv_caches[0][0].device.type == torch.device(device).type, "KV cache not on device"
            assert next(eng.model.parameters()).device.type == torch.device(device).type, "model not on device"
            if graphs and device == "cuda":
                assert runner.captured_sizes, f"{name}: no CUDA graph captured (cudagraph: {runner.cudagraph_status})"
            elif graphs:  # the CPU: the padded batch a graph would replay, eagerly
                runner.use_padded_decode(capture_sizes(runner.max_num_seqs, runner.max_step_tokens, GRAPH_MAX_BATCH))
            elif device == "cuda":
                assert not runner.captured_sizes and "enforce-eager" in runner.cudagraph_status
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy)
            got = [o.outputs[0].token_ids for o in outs]
            assert got == expected, f"{name}: engine {got} != reference {expected}"
            if stat is not None:
                assert getattr(eng.scheduler.stats, stat) > 0, f"{name}: no {stat}"
            assert eng.kv_blocks_held_by_requests() == 0 and not eng.has_unfinished_requests()
            if graphs:
                assert runner.padded_steps > 0, f"{name}: no decode step was padded"
                if device == "cuda":
                    assert runner.graph_replays > 0, f"{name}: no decode step replayed a graph"
            done[name] = {"equal": True, "cudagraph": runner.cudagraph_status,
                          "captured_sizes": runner.captured_sizes, "padded_steps": runner.padded_steps,
                          "graph_replays": runner.graph_replays, "kernels": eng.kernels.describe(),
                          "graph_safe_decode": eng.model.k.graph_safe_decode}
    return done


def check_bf16_and_sampling(folder: Path, vocab: int, device: str, attn_res: bool) -> dict:
    from engine import LLM, SamplingParams
    from tests.tiny import MAX_TOKENS, PROMPTS

    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(str(folder), max_model_len=64, device=device, dtype="bfloat16", kv_cache_memory=KV_BUDGET) as llm:
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        mixed = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, max_tokens=8, ignore_eos=True,
                                seed=7, logprobs=3, repetition_penalty=1.2, presence_penalty=0.5,
                                depth_attention=attn_res),
                 SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),  # engine generator
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={5: 2.0}),
                 SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True, seed=11, min_tokens=4)]
        a = llm.generate(prompts, mixed)
        b = llm.generate(prompts, mixed)
    for o in greedy + a:
        toks = o.outputs[0].token_ids
        assert toks and all(0 <= t < vocab for t in toks), f"invalid tokens {toks}"
    for i in (0, 3):  # seeded requests replay on the device generators
        assert a[i].outputs[0].token_ids == b[i].outputs[0].token_ids, "seeded sampling did not replay"
    assert a[0].outputs[0].logprobs and len(a[0].outputs[0].logprobs) == 8, "logprobs missing"
    return {"bf16_greedy": [o.outputs[0].token_ids for o in greedy]}


def check_prompt_logprobs(folder: Path, ref: torch.nn.Module, device: str) -> dict:
    """prompt_logprobs on the device's kernels, chunked prefill and a warm prefix cache: the reference's."""
    from engine import LLM, SamplingParams
    from tests.tiny import PROMPTS

    ref = ref.to(device)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    worst = 0.0
    with LLM(str(folder), max_model_len=64, device=device, dtype="float32", kv_cache_memory=KV_BUDGET,
             max_num_batched_tokens=5, block_size=4) as llm:
        llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=1))  # warm the prefix cache
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for p, o in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            want = torch.log_softmax(ref(torch.tensor([p], device=device))[0].float(), dim=-1).cpu()  # [T, V]
        lps = o.prompt_logprobs
        assert lps is not None and len(lps) == len(p) and lps[0] is None, "prompt_logprobs missing or short"
        for i in range(1, len(p)):
            lp = lps[i]
            assert lp is not None and lp.token_id == p[i] and len(lp.top) == 2
            worst = max(worst, abs(lp.logprob - float(want[i - 1, p[i]])))
    assert worst < 2e-3, f"prompt logprobs differ from the reference by up to {worst:.2e}"
    return {"max_abs_diff": worst}


def check_gpu_memory_utilization(folder: Path, ref: torch.nn.Module) -> dict:
    """CUDA: the KV cache sized by --gpu-memory-utilization after the profile step serves correctly and lands
    near its target; a utilization that leaves no room is the one-line error."""
    import gc

    from engine import LLM, SamplingParams
    from engine.model_runner import kv_bytes_per_block
    from tests.tiny import MAX_TOKENS, PROMPTS, reference_greedy

    expected = [reference_greedy(ref.to("cuda"), p, MAX_TOKENS, device="cuda") for p in PROMPTS]
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    u = 0.5
    with LLM(str(folder), max_model_len=64, device="cuda", dtype="float32", gpu_memory_utilization=u,
             enforce_eager=True) as llm:
        eng = llm.engine
        per_block = kv_bytes_per_block(eng.model_config, eng.config.dtype, eng.config.cache.block_size)
        kv_bytes = eng.kv.num_blocks * per_block
        used = total - torch.cuda.mem_get_info()[0]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o.outputs[0].token_ids for o in outs] == expected, "greedy tokens differ from the reference"
        detail = {"utilization": u, "total_gib": total / 2**30, "kv_blocks": eng.kv.num_blocks,
                  "kv_gib": kv_bytes / 2**30, "in_use_after_start_gib": used / 2**30}
    assert 0.3 * total < kv_bytes < u * total, f"KV cache {kv_bytes / 2**30:.2f} GiB is far from {u} of the GPU"
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    try:
        LLM(str(folder), max_model_len=64, device="cuda", dtype="float32", gpu_memory_utilization=0.001,
            max_num_batched_tokens=8192)
    except ValueError as e:
        assert "increase --gpu-memory-utilization or reduce --max-num-batched-tokens" in str(e), str(e)
        detail["no_room_error"] = str(e)
    else:
        raise AssertionError("gpu_memory_utilization=0.001 did not fail")
    return detail


def correctness(report: Report, device: str, tmp: Path, quick: bool = False) -> None:
    from models.checkpoint import save_checkpoint
    from tests.tiny import random_model, tiny_config

    for mode, bs, layers in CASES:
        label = f"{mode}{bs or ''}-L{layers}"
        cfg = tiny_config(mode, bs, layers=layers)
        ref = random_model(cfg)
        folder = save_checkpoint(ref.state_dict(), cfg, tmp / label, dtype=torch.float32)
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        for run_mode in MODES:
            if device == "cpu" and run_mode == "graphs(triton)":
                continue  # no Triton on the CPU; the padded path runs with the static-table ops
            report.run(f"engine_vs_reference[{label}] fp32 {device} {mode_label(run_mode, device)}",
                       lambda f=folder, r=ref, m=run_mode: check_engine_vs_reference(f, r, device, quick, m))
        report.run(f"prompt_logprobs[{label}] fp32 {device}",
                   lambda f=folder, r=ref: check_prompt_logprobs(f, r, device))
        report.run(f"bf16_and_sampling[{label}] {device}",
                   lambda f=folder, c=cfg: check_bf16_and_sampling(f, c.vocab_size, device, c.is_attn_res))
        if device == "cuda" and mode == "block":
            report.run(f"gpu_memory_utilization[{label}] cuda",
                       lambda f=folder, r=ref: check_gpu_memory_utilization(f, r))


# ---- a2. the triton kernels -------------------------------------------------------------------------------
TRITON_TESTS = "tests/kernels/test_triton_ops.py"
QUICK_TRITON_TESTS = "test_rms_norm or test_decode_attention"  # --quick on a CPU: the interpreter is slow
TRITON_TESTS_TIMEOUT = 300  # seconds; the GPU run compiles each kernel variant once (tens of seconds)


def check_triton_kernels(device: str, quick: bool, out_dir: Path) -> dict:
    """Run the triton kernel tests in a fresh process: compiled on CUDA (TRITON_INTERPRET unset), interpreted on
    CPU (TRITON_INTERPRET=1). The pytest output goes to OUT/triton_tests.log."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TRITON_TESTS]
    if quick and device == "cpu":
        cmd += ["-k", QUICK_TRITON_TESTS]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TRITON_TESTS_TIMEOUT)
    log = r.stdout + r.stderr
    (out_dir / "triton_tests.log").write_text(log)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", log)}
    summary = next((ln.strip("= ") for ln in reversed(log.splitlines()) if re.search(r"\d+ (passed|failed)", ln)),
                   log.strip().splitlines()[-1] if log.strip() else "no output")
    assert r.returncode == 0, f"pytest exit {r.returncode}: {summary} (OUT/triton_tests.log)"
    assert counts.get("passed", 0) > 0, f"no triton test ran on {device}: {summary}"  # e.g. all skipped
    return {"mode": "compiled" if device == "cuda" else "interpreted", "summary": summary, **counts}


def triton_kernels(report: Report, device: str, quick: bool, out_dir: Path) -> None:
    missing = [m for m in ("pytest", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"NOTE {' and '.join(missing)} not importable: the triton kernel tests are skipped", flush=True)
        return
    mode = "compiled" if device == "cuda" else "interpreted"
    report.run(f"triton kernel tests ({mode}) {device}", lambda: check_triton_kernels(device, quick, out_dir))


# ---- b. benchmarks ---------------------------------------------------------------------------------------
def weight_bytes(shape: dict, dtype: torch.dtype) -> int:
    from models.config import ModelConfig
    from models.llama import LlamaForServing

    with torch.device("meta"):
        model = LlamaForServing(ModelConfig(**shape), dtype=dtype, max_positions=16)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def benchmarks(report: Report, device: str, quick: bool) -> dict:
    from loadtest.bench_latency import compare, model_shape
    from loadtest.bench_throughput import copy_bandwidth

    prefill, batch, repeats, steps = ([32], [1, 2], 1, 3) if quick else ([2048], [1, 32, 128], 2, 8)
    results: dict[str, Any] = {}
    bw = report.run("copy_bandwidth", lambda: copy_bandwidth(1 << (24 if quick else 30), 5, device))
    results["copy_bandwidth_gb_s"] = bw / 1e9 if bw else None
    shapes = QUICK_SHAPES if quick else SHAPES
    for name, s in shapes.items():
        shape = model_shape(s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["ffn"], s["vocab"],
                            max(prefill) + 128)
        res = report.run(f"bench[{name}] AttnRes N=8 vs standard, bf16 {device}",
                         lambda sh=shape: compare(sh, 8, "bfloat16", prefill, batch, repeats, device, steps))
        if res:
            res["weight_bytes_standard"] = wb = weight_bytes(shape, torch.bfloat16)
            dec1 = next(r for r in res["rows"] if r["kind"] == "decode" and r["n"] == 1)
            if bw:
                res["roofline_b1_ms"] = roof = wb / bw * 1e3
                res["b1_fraction_of_roofline"] = {"standard": roof / dec1["standard_ms"],
                                                  "attnres": roof / dec1["attnres_ms"]}
            results[name] = res
    return results


def gpu_busy_us(prof: Any) -> float:
    """Microseconds during which the GPU ran anything (kernels, copies, memsets) in a torch.profiler run: the
    union of the device events' intervals (overlapping streams count once)."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def decode_step_gpu_share(device: str, quick: bool, tmp: Path) -> dict:
    """Batch-8 decode steps of an AttnRes model (Block, N=8, bf16, random weights), eager and with CUDA graphs
    (the same kernel set): each step's wall time (timed without the profiler, synchronised) and the GPU's
    busy time in it (torch.profiler over as many steps), so the idle share = 1 - busy / wall."""
    from engine import LLMEngine, SamplingParams
    from engine.arg_utils import EngineArgs
    from kernels.ops import BACKENDS
    from loadtest.bench_latency import model_pair, model_shape, write_random

    name, s = ("tiny", QUICK_SHAPES["tiny"]) if quick else ("smollm2-135m", SHAPES["smollm2-135m"])
    cfg = model_pair(model_shape(s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["ffn"], s["vocab"], 512),
                     8)[0]["attnres"]
    folder = write_random(tmp / "gpu_share", cfg, device)
    graph_mode = "graphs(triton)" if "triton" in BACKENDS else "graphs(static-table)"
    steps, batch = (5, 8) if quick else (40, 8)
    out: dict[str, Any] = {"shape": name, "batch": batch, "steps": steps, "graph_mode": graph_mode}
    for label, eager in (("eager", True), ("graphs", False)):
        with kernel_override(graph_mode):
            eng = LLMEngine(EngineArgs(
                model=str(folder), dtype="bfloat16", device=device, max_model_len=512, max_num_seqs=batch,
                max_num_batched_tokens=1024, kv_cache_memory="1GiB", enforce_eager=eager,
                kernels="triton" if graph_mode == "graphs(triton)" else "auto").create_engine_config())
        try:
            if not eager:
                assert eng.runner.captured_sizes, f"no graph captured: {eng.runner.cudagraph_status}"
            for i in range(batch):
                ids = torch.randint(3, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(i)).tolist()
                eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=3 * steps + 8, ignore_eos=True))
            for _ in range(4):  # the prefill, then warm decode steps
                eng.step()
            torch.cuda.synchronize()
            walls = []
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t)
            replays = eng.runner.graph_replays
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    eng.step()
                torch.cuda.synchronize()
            busy_ms = gpu_busy_us(prof) / 1e3 / steps
            wall_ms = sorted(walls)[len(walls) // 2] * 1e3
            if not eager:
                assert eng.runner.graph_replays - replays == steps, "not every profiled step replayed a graph"
            out[label] = {"step_ms": wall_ms, "gpu_busy_ms": busy_ms, "gpu_idle_share": max(0.0, 1 - busy_ms / wall_ms),
                          "cudagraph": eng.runner.cudagraph_status, "kernels": eng.kernels.name,
                          "graph_replays": eng.runner.graph_replays}
        finally:
            eng.shutdown()
            del eng
    assert out["graphs"]["gpu_busy_ms"] > 0, "the profiler saw no GPU activity in graph replays"
    return out


def hf_throughput(report: Report, device: str, quick: bool, tmp: Path) -> dict | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("NOTE transformers is not importable: offline throughput vs generate() skipped", flush=True)
        return None
    import random

    from loadtest.bench_latency import model_shape, write_random
    from loadtest.bench_throughput import run_depthserve, run_hf
    from models.config import ModelConfig

    s = QUICK_SHAPES["tiny"] if quick else SHAPES["smollm2-135m"]
    n, lo, hi = (2, 4, 8) if quick else (64, 32, 128)
    rng = random.Random(0)
    cfg = ModelConfig(**model_shape(s["layers"], s["hidden"], s["heads"], s["kv_heads"], s["ffn"], s["vocab"], 512))
    prompts = [[rng.randrange(3, s["vocab"]) for _ in range(rng.randint(lo, hi * 2))] for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]

    def run() -> dict:
        folder = write_random(tmp / "hf", cfg, device)
        ds = run_depthserve(folder, "bfloat16", prompts, outs, 512, device)
        hf = run_hf(folder, "bfloat16", prompts, outs, 4 if quick else 32, device)
        return {"shape": s, "num_prompts": n, "depthserve_tok_s": ds, "hf_tok_s": hf, "speedup": ds / hf}

    return report.run(f"throughput vs transformers generate() {device}", run)


# ---- output ------------------------------------------------------------------------------------------------
def markdown(out: dict) -> str:
    env = out["environment"]
    lines = ["# Device check", "",
             f"{env['device_name']} | torch {env['torch']} | CUDA {env['cuda']} | {env['date']} | "
             f"{'quick' if out['quick'] else 'full'} run, {out['seconds']:.0f} s", "",
             f"**{sum(c['ok'] for c in out['checks'])}/{len(out['checks'])} checks passed**", "",
             "| check | result | s |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'PASS' if c['ok'] else 'FAIL: ' + str(c['error'])[:200]} | {c['seconds']} |"
              for c in out["checks"]]
    bench = out.get("bench") or {}
    if bench.get("copy_bandwidth_gb_s"):
        lines += ["", f"Device copy bandwidth (read + write): {bench['copy_bandwidth_gb_s']:.0f} GB/s"]
    for name, res in bench.items():
        if not isinstance(res, dict) or "rows" not in res:
            continue
        lines += ["", f"## {name} (bf16, random weights; AttnRes Block N={res['config']['num_depth_blocks']})", "",
                  "| case | standard ms | AttnRes ms | overhead |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['standard_ms']:.2f} | {r['attnres_ms']:.2f} | {r['overhead_pct']:+.1f}% |"
                  for r in res["rows"]]
        if "b1_fraction_of_roofline" in res:
            f = res["b1_fraction_of_roofline"]
            lines += ["", f"Batch-1 decode vs HBM roofline ({res['weight_bytes_standard'] / 1e6:.0f} MB weights, "
                          f"{res['roofline_b1_ms']:.3f} ms): standard {f['standard'] * 100:.1f}%, "
                          f"AttnRes {f['attnres'] * 100:.1f}%"]
    share = out.get("gpu_share")
    if share:
        lines += ["", f"## Decode step, batch {share['batch']} ({share['shape']} AttnRes, bf16): GPU busy vs wall", "",
                  "| mode | step ms | GPU busy ms | GPU idle | cudagraph |", "|---|---|---|---|---|"]
        lines += [f"| {m} ({share[m]['kernels']}) | {share[m]['step_ms']:.3f} | {share[m]['gpu_busy_ms']:.3f} | "
                  f"{share[m]['gpu_idle_share'] * 100:.0f}% | {share[m]['cudagraph']} |"
                  for m in ("eager", "graphs") if m in share]
    hf = out.get("hf_throughput")
    lines += ["", "## Throughput vs transformers generate()", ""]
    lines += [f"depthserve {hf['depthserve_tok_s']:.0f} tok/s, transformers {hf['hf_tok_s']:.0f} tok/s "
              f"({hf['speedup']:.2f}x)" if hf else "skipped (transformers not importable, or the run failed)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device_check.json, RESULTS-gpu.md and triton_tests.log")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a smoke run of the script: two engine settings per "
                    "model, one tiny benchmark shape")
    ap.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    a = ap.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("FAIL torch.cuda.is_available() is False", flush=True)
        return 2
    t0 = time.perf_counter()
    report = Report()
    report.run("imports: engine/models need no server-only package", check_imports)
    out: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor()
                        or "cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "device": a.device, "quick": a.quick}

    def write() -> str:  # after every phase, so a run stopped at its time limit still leaves what it measured
        out["checks"] = report.checks
        out["seconds"] = time.perf_counter() - t0
        out["passed"] = all(c["ok"] for c in report.checks)
        (out_dir / "device_check.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        md = markdown(out)
        (out_dir / "RESULTS-gpu.md").write_text(md)
        return md

    out["bench"] = out["hf_throughput"] = out["gpu_share"] = None
    with tempfile.TemporaryDirectory() as tmp:
        correctness(report, a.device, Path(tmp), a.quick)
        write()
        triton_kernels(report, a.device, a.quick, out_dir)
        write()
        if not a.skip_bench:
            if a.device == "cuda":
                out["gpu_share"] = report.run("decode_step_gpu_share batch 8, eager vs graphs",
                                              lambda: decode_step_gpu_share(a.device, a.quick, Path(tmp)))
                write()
            out["bench"] = benchmarks(report, a.device, a.quick)
            write()
            out["hf_throughput"] = hf_throughput(report, a.device, a.quick, Path(tmp))
    print(write())
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
