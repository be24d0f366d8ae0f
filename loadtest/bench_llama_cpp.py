"""Batch-1 decode, depthserve vs llama.cpp on the same GGUF files: `depthserve bench llamacpp FILE ...`.

llama.cpp is what a CPU user would run instead, so this is the comparison that says where depthserve stands.
For each file, rounds alternate A B A B (the first round of each a warm-up; medians reported): llama.cpp
(``llama_cpp.Llama``, ``n_threads`` threads, from the cached build of loadtest/llama_cpp.py, in a worker
subprocess running that build's own venv) and depthserve's engine (in this process, ``num_threads`` the same),
each generating ``--tokens`` tokens greedily from the same prompt token ids, never both at once. Decode tok/s
is timed the same way for both, on the token stream: (tokens - 1) / (time of the last token - time of the
first), so the prompt's prefill is excluded. llama.cpp's own counters (llama_perf_context) are kept too.

Then the greedy check: a few built-in prompts, both engines greedy for ``--check-tokens`` tokens, the first
index where the token ids differ and both texts. The read-bandwidth roofline (loadtest.bench_latency.
read_bandwidth) is measured in the same run, before and after, and each file's bytes / roofline bound shown.

    python -m loadtest.llama_cpp build && python -m loadtest.llama_cpp quantize
    depthserve bench llamacpp --builtin --out bench_out/llama_cpp.json   # the four built-in formats
    depthserve bench llamacpp a.gguf b.gguf --rounds 5 --tokens 128

depthserve's dtype (activations) is bfloat16; ``--quantization`` is depthserve's (default auto: a GGUF file's
Q8_0/Q4_0/Q4_1 tensors are served in their stored format; ``none`` dequantizes them to bf16).

This module's top level imports only the standard library: the worker (``--worker llama``) runs under the
llama.cpp venv's Python, which has no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Fixed prompts, tokenized by depthserve's tokenizer of each file; both engines get the same ids.
BENCH_PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
                "combined movable metal type, oil-based ink and a screw press. Explain why this mattered:")
CHECK_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 12 times 7?\nA:",
)


# ----------------------------------------------------------------------------------------------- worker
def worker_llama(model: str, threads: int, n_ctx: int) -> int:
    """JSON lines on stdin/stdout: {"ids": [...], "n": N} -> {"ids": [...], "t": [stamps], "perf": {...}}."""
    here = Path(__file__).resolve().parent  # run as a script: its folder holds loadtest/llama_cpp.py, which
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # would shadow the package
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=512, verbose=False, seed=0)
    out = sys.stdout
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()
        _perf_reset(llama_cpp, llm)
        ids: list[int] = []
        stamps: list[float] = []
        t0 = time.perf_counter()
        for tok in llm.generate(req["ids"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                reset=True):
            stamps.append(time.perf_counter() - t0)
            ids.append(int(tok))
            if len(ids) >= req["n"]:
                break
        print(json.dumps({"ids": ids, "t": stamps, "perf": _perf(llama_cpp, llm)}), file=out, flush=True)
    return 0


def _perf_reset(llama_cpp: Any, llm: Any) -> None:
    with contextlib.suppress(Exception):  # older/newer bindings: the stream timing is the measurement anyway
        llama_cpp.llama_perf_context_reset(llm.ctx)


def _perf(llama_cpp: Any, llm: Any) -> dict[str, float]:
    """llama.cpp's own counters: prompt eval and eval (decode) time and counts."""
    try:
        d = llama_cpp.llama_perf_context(llm.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}
    except Exception:
        return {}


class LlamaWorker:
    """The llama.cpp side: a subprocess under the cached build's Python, one Llama kept loaded."""

    def __init__(self, python: Path, model: Path, threads: int, n_ctx: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--worker", "llama", str(model),
             "--threads", str(threads), "--ctx", str(n_ctx)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.version = hello.get("version", "?")

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited ({self.proc.wait()})")
        return json.loads(line)

    def generate(self, ids: list[int], n: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------ depthserve
class DepthserveRunner:
    """The depthserve side, in this process: one engine on the file, greedy, token stream timed per step."""

    def __init__(self, model: Path, threads: int, max_len: int, quantization: str,
                 quant_activations: str = "none") -> None:
        import torch

        from engine import LLMEngine
        from engine.arg_utils import EngineArgs

        torch.set_num_threads(threads)
        kw: dict[str, Any] = dict(model=str(model), dtype="bfloat16", device="cpu", num_threads=threads,
                                  max_model_len=max_len, max_num_seqs=4, kv_cache_memory="256MiB",
                                  quantization=quantization, quant_activations=quant_activations)
        self.quantization, self.quant_activations = quantization, quant_activations
        self.engine = LLMEngine(EngineArgs(**kw).create_engine_config())
        self.tokenizer = self.engine.tokenizer
        from loadtest.bench_throughput import weight_bytes

        self.weight_bytes = weight_bytes(self.engine)  # what a decode step reads: bf16 today, whatever the file

    def encode(self, text: str) -> list[int]:
        assert self.tokenizer is not None, "the GGUF file carries no tokenizer"
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(ids)

    def generate(self, ids: list[int], n: int, logprobs: int | None = None) -> dict:
        """Greedy, `n` tokens; with `logprobs`, each token's top alternatives too (for the greedy check only)."""
        from engine import SamplingParams

        eng = self.engine
        eng.add_request({"prompt_token_ids": ids}, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                                  logprobs=logprobs))
        out: list[int] = []
        stamps: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            for o in eng.step():  # DELTA outputs: each carries only the new ids
                new = list(o.outputs[0].token_ids)
                stamps += [time.perf_counter() - t0] * len(new)
                out += new
                tops += [list(lp.top) for lp in o.outputs[0].logprobs or []]
        return {"ids": out, "t": stamps, "top": tops}


# ------------------------------------------------------------------------------------------- measuring
def decode_rate(stamps: Sequence[float]) -> float:
    """Decode tokens per second from a token stream's arrival times: the first token (prefill) excluded."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token-id lists differ (a length difference counts); None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def at_difference(a: Sequence[int], b: Sequence[int], diff: int | None,
                  tops: Sequence[Sequence[tuple[int, float]]]) -> dict | None:
    """At the first differing token, how close depthserve's own choice was: its top-1 minus top-2 logprob and
    the logprob it gave llama.cpp's token (None if outside its top 5). A gap of a few hundredths is a
    near-tie that rounding (bf16 weights here, int8 activations in llama.cpp's quantized dot products) can
    flip; a large gap would point at a bug."""
    if diff is None or diff >= len(a) or diff >= len(b) or diff >= len(tops) or len(tops[diff]) < 2:
        return None
    top = list(tops[diff])
    other = next((lp for tok, lp in top if tok == a[diff]), None)
    return {"depthserve_top1_minus_top2": top[0][1] - top[1][1], "depthserve_logprob_of_llama_cpp_token": other,
            "depthserve_logprob_of_own_token": next((lp for tok, lp in top if tok == b[diff]), None)}


def bench_file(model: Path, python: Path, args: argparse.Namespace) -> dict:
    """One file: interleaved decode rounds, then the greedy check."""
    n_ctx = max(512, args.tokens + 256, args.check_tokens + 128)
    ds = DepthserveRunner(model, args.threads, n_ctx, args.quantization, args.quant_activations)
    prompt = ds.encode(BENCH_PROMPT)
    lw = LlamaWorker(python, model, args.threads, n_ctx)
    try:
        rates: dict[str, list[float]] = {"llama.cpp": [], "depthserve": []}
        perf_rates: list[float] = []
        for rnd in range(args.rounds + 1):
            order = [("llama.cpp", lw), ("depthserve", ds)]
            if rnd % 2:
                order.reverse()  # A B, B A: drift falls on both
            for name, runner in order:
                time.sleep(args.pause)  # let the other side's threads go idle (spin-waits)
                r = runner.generate(prompt, args.tokens)
                if rnd:
                    rates[name].append(decode_rate(r["t"]))
                    perf = r.get("perf") or {}
                    if perf.get("n_eval") and perf.get("t_eval_ms"):
                        perf_rates.append(perf["n_eval"] / perf["t_eval_ms"] * 1e3)
            print(f"  round {rnd}{' (warm-up)' if not rnd else ''}: "
                  + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items() if v and rnd), flush=True)
        checks = []
        for text in CHECK_PROMPTS:
            ids = ds.encode(text)
            a = lw.generate(ids, args.check_tokens)["ids"]
            got = ds.generate(ids, args.check_tokens, logprobs=5)
            b = got["ids"]
            diff = first_difference(a, b)
            checks.append({"prompt": text, "first_diff": diff, "llama_cpp_ids": a, "depthserve_ids": b,
                           "llama_cpp_text": ds.decode(a), "depthserve_text": ds.decode(b),
                           "at_diff": at_difference(a, b, diff, got["top"])})
        version = lw.version
    finally:
        lw.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"file": str(model), "name": model.name, "bytes": model.stat().st_size,
            "depthserve_weight_bytes": ds.weight_bytes, "prompt_tokens": len(prompt),
            "tokens": args.tokens, "llama_cpp_version": version, "quantization": ds.quantization,
            "quant_activations": ds.quant_activations,
            "decode_tok_s": med, "samples": rates,
            "llama_cpp_perf_tok_s": statistics.median(perf_rates) if perf_rates else None,
            "ratio": med["depthserve"] / med["llama.cpp"], "greedy": checks}


def roofline_tok_s(nbytes: int, bandwidth_gbs: float) -> float:
    """The batch-1 bound if every step read the whole file once (weights dominate at this context)."""
    return bandwidth_gbs * 1e9 / nbytes


def markdown(result: dict) -> str:
    """Decode table plus the greedy check, one line per file and prompt."""
    bw = result["read_bandwidth_gbs"]["roofline"]
    lines = ["| file | file MiB | llama.cpp tok/s | depthserve tok/s | depthserve / llama.cpp | roofline tok/s "
             "(file bytes) | llama.cpp % roof | depthserve weights MiB | depthserve % of its roof |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in result["files"]:
        lc, ds = f["decode_tok_s"]["llama.cpp"], f["decode_tok_s"]["depthserve"]
        roof = roofline_tok_s(f["bytes"], bw)
        wb = f.get("depthserve_weight_bytes") or f["bytes"]
        lines.append(f"| {f['name']} | {f['bytes'] / 2**20:.0f} | {lc:.1f} | {ds:.1f} | {f['ratio']:.2f}x "
                     f"| {roof:.0f} | {lc / roof * 100:.0f}% | {wb / 2**20:.0f} "
                     f"| {ds / roofline_tok_s(wb, bw) * 100:.0f}% |")
    lines += ["", "| file | prompt | first differing token (depthserve top-1 - top-2 logprob there) | llama.cpp text "
              "| depthserve text |",
              "|---|---|---:|---|---|"]
    for f in result["files"]:
        for c in f["greedy"]:
            d = "equal" if c["first_diff"] is None else str(c["first_diff"])
            if c.get("at_diff"):
                d += f" (gap {c['at_diff']['depthserve_top1_minus_top2']:.3f})"
            lines.append(f"| {f['name']} | {_cell(c['prompt'])} | {d} | {_cell(c['llama_cpp_text'])} "
                         f"| {_cell(c['depthserve_text'])} |")
    return "\n".join(lines)


def _cell(s: str, width: int = 80) -> str:
    s = s.replace("|", "\\|").replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 1] + "…"


def builtin_files() -> list[Path]:
    """The built-in model in BF16, Q8_0, Q4_0 (made by `python -m loadtest.llama_cpp quantize`) and Q4_1."""
    from loadtest.llama_cpp import quantize

    q = quantize()
    return [q[t] for t in ("BF16", "Q8_0", "Q4_0", "Q4_1") if t in q]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="depthserve bench llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files (with --builtin: added after those)")
    p.add_argument("--builtin", action="store_true",
                   help="the built-in SmolLM2-135M-Instruct as BF16, Q8_0, Q4_0 and Q4_1 (quantized on first use)")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per round")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per engine (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens per prompt in the greedy check")
    p.add_argument("--quantization", default="auto",
                   help="depthserve's --quantization (auto: GGUF tensors served as stored; none: dequantized to bf16)")
    p.add_argument("--quant-activations", default="none", choices=["none", "int8"],
                   help="depthserve's --quant-activations (int8: prompts rounded to int8 blocks, as llama.cpp does)")
    p.add_argument("--pause", type=float, default=0.3, help="seconds idle before each round")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--worker", choices=["llama"], help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=int, default=1024, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "llama":
        return worker_llama(str(args.files[0]), args.threads, args.ctx)
    from loadtest.bench_latency import read_bandwidth
    from loadtest.llama_cpp import require

    lay = require()
    files = (builtin_files() if args.builtin else []) + list(args.files)
    if not files:
        print("depthserve bench llamacpp: error: give GGUF files or --builtin", file=sys.stderr)
        return 2
    load = os.getloadavg()
    bw_before = read_bandwidth()
    print(f"read bandwidth {bw_before:.1f} GB/s; load average {load[0]:.2f}", flush=True)
    results = []
    for f in files:
        print(f"{f.name}:", flush=True)
        results.append(bench_file(f, lay.python, args))
    bw_after = read_bandwidth()
    result = {"config": {"tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
                         "check_tokens": args.check_tokens, "prompt": BENCH_PROMPT, "dtype": "bfloat16",
                         "load_average_start": load, "load_average_end": os.getloadavg(), "cpus": os.cpu_count()},
              "read_bandwidth_gbs": {"before": bw_before, "after": bw_after, "roofline": max(bw_before, bw_after)},
              "files": results}
    return report(markdown(result), result, args.out)


def report(table: str, result: dict[str, Any], out: Path | None) -> int:
    """Print the table, write the JSON where asked (both llama.cpp benches end so)."""
    from loadtest.bench_latency import write_json

    print()
    print(table)
    if out:
        write_json(out, result)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
