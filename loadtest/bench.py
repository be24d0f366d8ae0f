"""`depthserve bench latency|throughput|serving|compare ...`: the benchmarks (see each module's --help)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "latency": "loadtest.bench_latency",  # AttnRes vs standard residual, same shape, interleaved
    "throughput": "loadtest.bench_throughput",  # depthserve vs transformers generate(), roofline
    "serving": "loadtest.bench_serving",  # against a running server: TTFT, TPOT, ITL, goodput
    "compare": "loadtest.bench_compare",  # models side by side: latency, throughput, perplexity, plots
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print("usage: depthserve bench {latency,throughput,serving,compare} [options]  (add --help for a command's options)",
              file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(COMMANDS[args[0]]).main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
