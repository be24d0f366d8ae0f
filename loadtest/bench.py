"""`depthserve bench latency|throughput|serving|compare ...`: the benchmarks (see each module's --help)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "latency": "loadtest.bench_latency",  # AttnRes vs standard residual, same shape, interleaved
    "throughput": "loadtest.bench_throughput",  # depthserve vs transformers generate(), roofline
    "serving": "loadtest.bench_serving",  # against a running server: TTFT, TPOT, ITL, goodput
    "compare": "loadtest.bench_compare",  # models side by side: latency, throughput, perplexity, plots
    "llamacpp": "loadtest.bench_llama_cpp",  # batch-1 decode and greedy text vs llama.cpp, same GGUF files
    "vs-llama-server": "loadtest.bench_vs_llama_server",  # serving load vs llama-server, same GGUF files
}


USAGE = ("usage: depthserve bench {latency,throughput,serving,compare,llamacpp,vs-llama-server} [options]  "
         "(depthserve bench COMMAND --help)")
HELP = {
    "latency": "AttnRes vs a standard-residual model of the same shape: decode and prefill times, interleaved "
               "(--model A --baseline B: two checkpoints)",
    "throughput": "depthserve vs transformers generate() on the same model, and the decode roofline "
                  "(--model A --baseline B: two checkpoints)",
    "serving": "a running server under load: TTFT, TPOT, ITL, E2E latency, goodput (--model A B: per model)",
    "compare": "models side by side: latency, throughput, perplexity, depth attention, in a report with plots",
    "llamacpp": "batch-1 decode tok/s and greedy text vs llama.cpp on the same GGUF files, with the roofline "
                "(needs `python -m loadtest.llama_cpp build`)",
    "vs-llama-server": "serving at 1/8/32 streams vs llama-server on the same GGUF files: tok/s, TTFT, TPOT "
                       "(needs `python -m loadtest.llama_cpp build`)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\ncommands:")
        for name, what in HELP.items():
            print(f"  {name:<16} {what}")
        return 0
    if not args or args[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(args[0], list(COMMANDS), n=1) if args else []
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"{USAGE}\ndepthserve bench: error: {'unknown command ' + repr(args[0]) if args else 'no command'}"
              f"{hint} (depthserve bench --help)", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(COMMANDS[args[0]]).main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
