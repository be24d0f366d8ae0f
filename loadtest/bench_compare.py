"""`depthserve bench compare A B`: speed and quality of two (or more) models in one Markdown report with plots.

    depthserve bench compare ./runs/attnres ./runs/baseline --out-dir compare_out
    depthserve bench compare shakespeare-attnres shakespeare-residual     # the built-in twins

The last model is the baseline. One engine per model, built once, runs (bench_models; turns A B A B, a warm-up
round first, medians):

- latency: time to first token of one prompt per --prefill length, and a decode step per --batch size;
- throughput: the same --num-prompts requests through each model, output tokens/s, and every request's TTFT
  and TPOT in that burst;
- quality: perplexity and bits per byte on --eval-file (default: the held-out Macbeth and Twelfth Night that
  ship with the built-in models), through the engine's prompt logprobs (engine/perplexity.py);
- depth attention: for each AttnRes model, the mean weight of every mixing site on every source, over the
  tokens of a few prompts and their continuations.

`--out-dir` gets report.md (tables, and the plots beside it as PNG: latency vs batch, TTFT/TPOT distributions,
throughput, perplexity, depth-attention heatmaps) and report.json with every number. Plots need matplotlib
(the `viz` extra: `pip install -e ".[viz]"`).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.depth_inspect import draw as draw_depth
from engine.depth_inspect import mean_map
from engine.perplexity import perplexity
from engine.sampling_params import SamplingParams
from loadtest.bench_latency import write_json
from loadtest.bench_models import (
    BenchError,
    Model,
    engine_args,
    latency,
    load_models,
    load_text,
    markdown_latency,
    markdown_throughput,
    named,
    throughput,
)

DEPTH_PROMPTS = ["HAMLET.\nTo be, or not to be, that is the question:", "ROMEO.\nBut soft, what light through "
                 "yonder window breaks?", "KING LEAR.\nBlow, winds, and crack your cheeks!"]


def depth_map(m: Model, prompts: list[str], max_tokens: int = 16) -> tuple[list[list[float]], int]:
    """Mean depth weights (sites x sources) over the prompts' tokens and their greedy continuations."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, depth_attention=True, prompt_depth_attention=True)
    entries = []
    for out in m.llm.generate(prompts, params):
        comp = out.outputs[0]
        entries += (out.prompt_depth_attention or []) + (comp.depth_attention or [])[1:]
    return mean_map(entries), len(entries)


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    plt = _plt()
    dec = [r for r in rows if r["kind"] == "decode"]
    pre = [r for r in rows if r["kind"] == "prefill"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        if dec:
            axes[0].plot([r["n"] for r in dec], [r["ms"][name] for r in dec], marker="o", label=name)
        if pre:
            axes[1].plot([r["n"] for r in pre], [r["ms"][name] for r in pre], marker="o", label=name)
    axes[0].set(xlabel="decode batch (sequences)", ylabel="ms per decode step", title="decode step latency vs batch")
    axes[1].set(xlabel="prompt tokens", ylabel="ms to first token", title="prefill latency vs prompt length")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_tpot(requests: dict[str, dict[str, list[float]]], names: list[str], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        data = [requests[n][key] or [0.0] for n in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        ax.set_title(f"{title} per request, one burst", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(values: dict[str, float], names: list[str], ylabel: str, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bars = ax.bar(names, [values[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(models: dict[str, Model], eval_text: str, out_dir: Path, prefill: list[int], batch: list[int],
            repeats: int, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
            plots: bool = True, log: Any = print) -> dict[str, Any]:
    """Run every part, write report.json, report.md and the plots into out_dir; the report as a dict."""
    names = list(models)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log("latency ...")
    lat = latency(models, prefill, batch, repeats)
    log(f"throughput ... ({time.monotonic() - t0:.0f} s)")
    tp = throughput(models, num_prompts, input_len, output_len, repeats)
    log(f"perplexity ... ({time.monotonic() - t0:.0f} s)")
    ppl = {n: perplexity(m.llm, eval_text, n) for n, m in models.items()}
    depth: dict[str, Any] = {}
    for n, m in models.items():
        if m.engine.model_config.is_attn_res:
            grid, tokens = depth_map(m, DEPTH_PROMPTS)
            depth[n] = {"mean": grid, "tokens": tokens}
    report = {"models": {n: str(m.engine.config.model) for n, m in models.items()}, "baseline": names[-1],
              "dtype": str(next(iter(models.values())).engine.config.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "latency": lat, "throughput": tp,
              "perplexity": {n: {"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}
                             for n, r in ppl.items()},
              "depth_attention": depth, "seconds": time.monotonic() - t0}
    write_json(out_dir / "report.json", report)
    if plots:
        plot_latency(lat, names, out_dir / "latency.png")
        plot_ttft_tpot(tp["requests"], names, out_dir / "ttft_tpot.png")
        plot_bars(tp["tok_s"], names, "output tokens / s", "throughput (continuous batching)", out_dir / "throughput.png")
        plot_bars({n: r.perplexity for n, r in ppl.items()}, names, "perplexity (lower is better)",
                  "held-out perplexity", out_dir / "perplexity.png")
        for n, d in depth.items():
            draw_depth(d["mean"], f"{n}: depth weights averaged over {d['tokens']} tokens", out_dir / f"depth_{n}.png")
    (out_dir / "report.md").write_text(markdown(report, plots), encoding="utf-8")
    return report


def summary_table(report: dict[str, Any]) -> str:
    """One row per model: the headline numbers (what the README shows)."""
    names = list(report["models"])
    lat = {r["case"]: r["ms"] for r in report["latency"]}
    decode = [r for r in report["latency"] if r["kind"] == "decode"]
    prefill = [r for r in report["latency"] if r["kind"] == "prefill"]
    cols = [f"decode b={r['n']} ms" for r in decode[:1] + decode[-1:] if r] + \
        [f"TTFT {r['n']} tok ms" for r in prefill[-1:]]
    cases = [r["case"] for r in decode[:1] + decode[-1:]] + [r["case"] for r in prefill[-1:]]
    if len(decode) == 1:
        cols, cases = cols[1:], cases[1:]
    head = ["model", *cols, "output tok/s", "perplexity", "bits/byte"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n in names:
        p = report["perplexity"][n]
        cells = [f"{lat[c][n]:.2f}" for c in cases]
        lines.append(f"| {n} | " + " | ".join([*cells, f"{report['throughput']['tok_s'][n]:.1f}",
                                                 f"{p['perplexity']:.2f}", f"{p['bits_per_byte']:.4f}"]) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], plots: bool = True) -> str:
    names = list(report["models"])
    base = report["baseline"]
    img = (lambda f, alt: f"![{alt}]({f})\n") if plots else (lambda f, alt: "")
    tp = report["throughput"]
    ppl_rows = ["| model | perplexity | bits/byte | tokens |", "|---|---|---|---|"]
    ppl_rows += [f"| {n} | {p['perplexity']:.3f} | {p['bits_per_byte']:.4f} | {p['tokens']} |"
                 for n, p in report["perplexity"].items()]
    ttft = {n: statistics.median(tp["requests"][n]["ttft_ms"] or [0.0]) for n in names}
    listed = ", ".join(f"`{n}` ({report['models'][n]})" for n in names)
    parts = [
        f"# {' vs '.join(names)}", "",
        f"Models: {listed}; baseline `{base}`. "
        f"{report['dtype']}, {report['threads']} torch threads; engines run in turn, medians; ratios are over the "
        "baseline, measured in the same run.", "",
        "## Summary", "", summary_table(report), "",
        "## Latency", "", markdown_latency(report["latency"], names), "", img("latency.png", "latency vs batch"),
        "## Throughput and per-request latency", "", markdown_throughput(tp, names), "",
        img("throughput.png", "throughput"), img("ttft_tpot.png", "TTFT and TPOT distributions"),
        "TTFT in a burst includes the time a request waits for a place in the batch "
        f"(median {', '.join(f'{n} {ttft[n]:.0f} ms' for n in names)}).", "",
        "## Quality", "", "\n".join(ppl_rows), "",
        "Every token of the evaluation text is scored once (disjoint windows of the context length, each after the "
        "previous window's tokens), through the engine's prompt logprobs.", "", img("perplexity.png", "perplexity"),
    ]
    if report["depth_attention"]:
        parts += ["## Depth attention", "",
                  "Mean weight each mixing site (rows: layer i attention / MLP, then the output head) puts on each "
                  "source (the embedding, then completed blocks; a site's last source is its partial sum).", ""]
        parts += [img(f"depth_{n}.png", f"depth attention of {n}") for n in report["depth_attention"]]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="depthserve bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL",
                    help="checkpoint folders, .gguf files or built-in names; the last is the baseline")
    ap.add_argument("--out-dir", type=Path, default=Path("compare_out"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts-file", default=None, help="text the benchmark prompts are cut from (default: the "
                                                          "built-ins' held-out plays)")
    ap.add_argument("--eval-file", default=None, help="text to score (default: the built-ins' held-out plays)")
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 448])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up round (medians)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--kv-cache-memory", default=None, help="each model's KV cache (default: the engine's)")
    ap.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    a = ap.parse_args(argv)
    err = "depthserve bench compare: error: "
    if len(a.models) < 2:
        ap.exit(2, f"{err}give at least two models (the last is the baseline)\n")
    if not a.no_plots and importlib.util.find_spec("matplotlib") is None:
        ap.exit(2, f"{err}the plots need matplotlib: install the viz extra (pip install -e \".[viz]\"), "
                   "or pass --no-plots\n")
    try:
        prompts, eval_text = load_text(a.prompts_file), load_text(a.eval_file)
        args = engine_args("", a.dtype, max_num_seqs=max(64, *a.batch), max_num_batched_tokens=max(2048, *a.prefill),
                           device=a.device, num_threads=a.num_threads, kv_cache_memory=a.kv_cache_memory)
        models = load_models(named(a.models[:-1], a.models[-1:]), prompts, args)
    except BenchError as e:
        ap.exit(2, f"{err}{e}\n")
    try:
        report = compare(models, eval_text, a.out_dir, a.prefill, a.batch, a.repeats, a.num_prompts,
                         tuple(a.input_len), tuple(a.output_len), plots=not a.no_plots,
                         log=lambda s: print(f"bench compare: {s}", file=sys.stderr))
    except ValueError as e:  # e.g. a model without a tokenizer for perplexity
        ap.exit(2, f"{err}{e}\n")
    finally:
        for m in models.values():
            m.llm.shutdown()
    print(summary_table(report))
    print(f"\nwrote {a.out_dir / 'report.md'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
