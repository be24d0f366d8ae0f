"""Serving, depthserve vs llama-server on the same GGUF file: `depthserve bench vs-llama-server FILE ...`.

Batch-1 decode (bench_llama_cpp) is not what a server sees; this runs the same load against both servers.
For each file and each concurrency, it starts one server (never both at once), runs `depthserve bench
serving` against it (the same seeded token-id prompts: both servers tokenize with the file's own
tokenizer, so the pools agree; ``ignore_eos`` + ``max_tokens`` make every request produce exactly
``--output-len`` tokens, which is checked), stops it, then does the same with the other server:

* llama-server (the cached build of loadtest/llama_cpp.py): ``-m FILE --parallel N -c N*(in+out+64) -t T
  -tb T --port P`` (N = the concurrency: one slot per stream, as a user would set it);
* depthserve: ``depthserve serve FILE --port P --dtype bfloat16 --num-threads T --max-num-seqs max(N, 8)``
  (plus ``--quantization Q`` where given; the default, auto, serves GGUF tensors in their stored format).

Each measured run follows a short warm-up run. Reports output tok/s, TTFT p50 and TPOT p50 per server and
concurrency; ``--out`` writes them (with each run's full bench_serving summary) as JSON. Servers are started
in their own process group and killed on exit, errors and SIGTERM.

    depthserve bench vs-llama-server --builtin --out bench_out/vs_llama_server.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.servers import kill_all, on_sigterm, server

SERVERS = ("llama.cpp", "depthserve")


def llama_server_cmd(binary: Path, model: Path, port: int, concurrency: int, threads: int,
                     input_len: int, output_len: int, extra: Sequence[str] = ()) -> list[str]:
    """One slot per stream, each with room for its prompt, its output and a margin; `extra` appended."""
    ctx = concurrency * (input_len + output_len + 64)
    return [str(binary), "-m", str(model), "--parallel", str(concurrency), "-c", str(ctx), "-t", str(threads),
            "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *extra]


def depthserve_cmd(model: Path, port: int, concurrency: int, threads: int, input_len: int, output_len: int,
                   quantization: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """`depthserve serve` through this interpreter, so the worktree's code is what runs."""
    cmd = [sys.executable, "-m", "server.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--num-threads", str(threads), "--max-num-seqs", str(max(concurrency, 8)),
           "--max-model-len", str(max(512, input_len + output_len + 64))]
    if quantization:
        cmd += ["--quantization", quantization]
    return [*cmd, *extra]


def run_bench(url: str, concurrency: int, num_prompts: int, input_len: int, output_len: int,
              out: Path, seed: int = 0) -> dict:
    """One `depthserve bench serving` run (in this process), its JSON summary."""
    from loadtest.bench_serving import main as bench_serving

    argv = ["--base-url", url, "--concurrency", str(concurrency), "--num-prompts", str(num_prompts),
            "--input-len", str(input_len), "--output-len", str(output_len), "--seed", str(seed), "--out", str(out)]
    rc = bench_serving(argv)
    if not out.exists():
        raise RuntimeError(f"bench serving exited {rc} with no results")
    return json.loads(out.read_text())


def num_prompts_for(concurrency: int, per_stream: int = 2, minimum: int = 4) -> int:
    """Enough requests that every stream runs `per_stream` in a row (the closed loop stays full)."""
    return max(minimum, per_stream * concurrency)


def row(summary: dict, expected_tokens: int) -> dict:
    """The figures compared, and whether every request produced its tokens."""
    return {"output_tok_s": summary["output_throughput"], "ttft_p50_ms": summary["ttft_ms"]["p50"],
            "tpot_p50_ms": summary["tpot_ms"]["p50"], "completed": summary["completed"],
            "failed": summary["failed"], "output_tokens": summary["total_output_tokens"],
            "exact_output": summary["total_output_tokens"] == expected_tokens and not summary["failed"],
            "duration_s": summary["duration_s"]}


def markdown(result: dict) -> str:
    """One row per file and concurrency: both servers' throughput, TTFT and TPOT, and the ratio."""
    lines = ["| file | streams | llama.cpp tok/s | depthserve tok/s | ratio | llama.cpp TTFT p50 ms "
             "| depthserve TTFT p50 ms | llama.cpp TPOT p50 ms | depthserve TPOT p50 ms | exact tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f in result["files"]:
        for c, servers in sorted(f["runs"].items(), key=lambda kv: int(kv[0])):
            lc, ds = servers.get("llama.cpp"), servers.get("depthserve")
            ratio = (f"{ds['output_tok_s'] / lc['output_tok_s']:.2f}x" if lc and ds and lc["output_tok_s"]
                     else "n/a")
            exact = "yes" if all(r["exact_output"] for r in servers.values()) else "NO"
            lines.append(f"| {f['name']} | {c} | {_fmt(lc, 'output_tok_s', '.1f')} | {_fmt(ds, 'output_tok_s', '.1f')} "
                         f"| {ratio} | {_fmt(lc, 'ttft_p50_ms', '.0f')} | {_fmt(ds, 'ttft_p50_ms', '.0f')} "
                         f"| {_fmt(lc, 'tpot_p50_ms', '.1f')} | {_fmt(ds, 'tpot_p50_ms', '.1f')} | {exact} |")
    return "\n".join(lines)


def _fmt(r: dict | None, key: str, spec: str) -> str:
    return "n/a" if r is None or r.get(key) is None else format(r[key], spec)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="depthserve bench vs-llama-server", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files")
    p.add_argument("--builtin", action="store_true",
                   help="the built-in SmolLM2-135M-Instruct as BF16 and Q8_0 (quantized on first use)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--per-stream", type=int, default=2, help="requests per stream (num-prompts = this x streams)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--quantization", default=None, help="passed to `depthserve serve --quantization`")
    p.add_argument("--depthserve-args", default="", help="extra `depthserve serve` flags, e.g. '--small-step-rows 0'")
    p.add_argument("--llama-server-args", default="",
                   help="extra llama-server flags, e.g. '--poll 0' (its threads sleep instead of spinning: "
                        "kinder on a machine shared with other work)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from loadtest.bench_llama_cpp import report
    from loadtest.llama_cpp import quantize, require
    from loadtest.ports import free_port

    lay = require(what=("binaries",)) if "llama.cpp" in args.servers or args.builtin else None
    files = list(args.files)
    if args.builtin:
        q = quantize(lay, types=("BF16", "Q8_0"))
        files = [q["BF16"], q["Q8_0"]] + files
    if not files:
        print("depthserve bench vs-llama-server: error: give GGUF files or --builtin", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    result: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                         if k != "files"} | {"load_average_start": os.getloadavg()},
                              "files": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                entry: dict[str, Any] = {"file": str(f), "name": f.name, "runs": {}, "commands": {}}
                result["files"].append(entry)
                for c in args.concurrency:
                    n = num_prompts_for(c, args.per_stream)
                    for name in args.servers:
                        port = args.port or free_port()
                        cmd = (llama_server_cmd(lay.binary("llama-server"), f, port, c, args.threads,  # type: ignore[union-attr]
                                                args.input_len, args.output_len, shlex.split(args.llama_server_args))
                               if name == "llama.cpp" else
                               depthserve_cmd(f, port, c, args.threads, args.input_len, args.output_len,
                                              args.quantization, shlex.split(args.depthserve_args)))
                        entry["commands"][f"{name} c={c}"] = " ".join(cmd)
                        print(f"== {f.name} {name} concurrency {c} ({n} requests)", flush=True)
                        with server(cmd, port, Path(tmp) / f"{name}-{c}.log") as url:
                            run_bench(url, c, min(n, max(c, 2)), 16, 8, Path(tmp) / "warm.json")  # warm-up
                            s = run_bench(url, c, n, args.input_len, args.output_len, Path(tmp) / "run.json")
                        r = row(s, n * args.output_len)
                        r["summary"] = {k: v for k, v in s.items() if k != "requests"}
                        entry["runs"].setdefault(str(c), {})[name] = r
                        print(f"   {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                              f"TPOT p50 {r['tpot_p50_ms']:.1f} ms, exact output: {r['exact_output']}", flush=True)
    finally:
        kill_all()
    result["config"]["load_average_end"] = os.getloadavg()
    return report(markdown(result), result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
