"""Serving throughput and latency at torch threads = cores vs cores - 1 (issue 13's thread-default study).

The event loop, tokenization and detokenisation share the cores with the engine's OpenMP threads; with as
many OpenMP threads as cores, any other busy thread stalls their barriers. This starts `depthserve serve`
once per setting, runs `bench_serving` at each concurrency against it, and alternates the settings over
`--rounds` rounds (A B A B) so drift on a shared machine hits both. Medians per (threads, concurrency).

    python -m loadtest.thread_study --out bench_out/threads.json          # the built-in model
    python -m loadtest.thread_study --model PATH --dtype bfloat16 --concurrency 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.bench_latency import write_json
from loadtest.ports import free_port
from loadtest.servers import server


def run_setting(threads: int, concurrency: list[int], num_prompts: int, input_len: int, output_len: int,
                serve_args: list[str], workdir: Path) -> dict[int, dict]:
    """One server with `threads` torch threads; bench_serving at each concurrency. -> {concurrency: summary}."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level", "warning", "--num-threads",
           str(threads), *serve_args]
    out: dict[int, dict] = {}
    with server(cmd, port, workdir / f"server-t{threads}.log") as url:
        for c in concurrency:
            path = workdir / f"t{threads}-c{c}.json"
            subprocess.run([sys.executable, "-m", "loadtest.bench_serving", "--base-url", url, "--num-prompts",
                            str(num_prompts), "--concurrency", str(c), "--input-len", str(input_len), "--output-len",
                            str(output_len), "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
            s = json.loads(path.read_text())
            out[c] = {"output_tok_s": s["output_throughput"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                      "tpot_p50_ms": s["tpot_ms"]["p50"], "failed": s["failed"]}
    return out


def study(threads: list[int], concurrency: list[int], rounds: int, num_prompts: int, input_len: int,
          output_len: int, serve_args: list[str]) -> dict:
    samples: dict[tuple[int, int], list[dict]] = {(t, c): [] for t in threads for c in concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for t in threads:
                for c, res in run_setting(t, concurrency, num_prompts, input_len, output_len, serve_args,
                                          Path(tmp)).items():
                    samples[t, c].append(res)
    rows = [{"threads": t, "concurrency": c,
             **{k: statistics.median(r[k] for r in rs) for k in ("output_tok_s", "ttft_p50_ms", "tpot_p50_ms")},
             "failed": sum(r["failed"] for r in rs)} for (t, c), rs in samples.items()]
    best = {c: max((r for r in rows if r["concurrency"] == c), key=lambda r: r["output_tok_s"])["threads"]
            for c in concurrency}
    return {"config": {"cores": os.cpu_count(), "threads": threads, "concurrency": concurrency, "rounds": rounds,
                       "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
                       "serve_args": serve_args},
            "rows": rows, "best_threads_by_concurrency": best}


def markdown(result: dict) -> str:
    lines = ["| torch threads | streams | output tok/s | TTFT p50 ms | TPOT p50 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['concurrency']} | {r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['tpot_p50_ms']:.1f} |" for r in sorted(result["rows"], key=lambda r: (r["concurrency"], -r["threads"]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({cores, max(1, cores - 1)}, reverse=True))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default="bench_out/threads.json")
    a, serve_args = ap.parse_known_args(argv)
    result = study(a.threads, a.concurrency, a.rounds, a.num_prompts, a.input_len, a.output_len, serve_args)
    print(markdown(result))
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
