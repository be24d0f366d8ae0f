"""`depthserve inspect`: which earlier blocks each AttnRes site reads, on a model's own prompts.

Runs the prompts through the engine with depth-attention recording on (the weights the fast path
really used), writes them as JSON, and draws two heatmaps: sites x sources averaged over every
token, and the map of one token.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from engine.arg_utils import EngineArgs, FriendlyParser
from engine.config import DTYPE_CHOICES
from engine.depth_stats import entropy, site_labels, source_label
from engine.llm_engine import LLM
from engine.sampling_params import SamplingParams

MATPLOTLIB_INSTALL = 'pip install "matplotlib>=3.7"'
Entry = list[list[float]]  # per site: weights over its sources


def mean_map(entries: list[Entry]) -> list[list[float]]:
    """Average per site and source over tokens; sites keep their own number of sources."""
    sites = len(entries[0])
    return [[sum(e[s][j] for e in entries) / len(entries) for j in range(len(entries[0][s]))] for s in range(sites)]


def draw(matrix: list[list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(r) for r in matrix)
    grid = np.full((len(matrix), width), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.6 * width), 1.2 + 0.28 * len(matrix)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(matrix)), site_labels(len(matrix)), fontsize=7)
    ax.set_xticks(range(width), [source_label(j) for j in range(width)], fontsize=7, rotation=45)
    ax.set_xlabel("source: completed blocks from the embedding on; a site's last source is its partial sum",
                  fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="depth weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inspect(model: str, prompts: list[str], out_dir: Path, max_tokens: int = 16, token_index: int = -1,
            dtype: str = EngineArgs.dtype) -> dict:
    llm = LLM(model, dtype=dtype)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, depth_attention=True, prompt_depth_attention=True)
    outs = llm.generate(prompts, params)
    tok = llm.engine.tokenizer
    records = []
    all_entries: list[Entry] = []
    for out in outs:
        comp = out.outputs[0]
        ids = out.prompt_token_ids + comp.token_ids
        entries = (out.prompt_depth_attention or []) + (comp.depth_attention or [])[1:]
        pieces = [tok.id_to_token(i) for i in ids] if tok else [str(i) for i in ids]
        records.append({"prompt": out.prompt, "completion": comp.text, "tokens": pieces[: len(entries)],
                        "depth_attention": entries})
        all_entries += entries
    out_dir.mkdir(parents=True, exist_ok=True)
    avg = mean_map(all_entries)
    summary = {"model": model, "sites": site_labels(len(avg)), "mean": avg,
               "mean_entropy": [sum(entropy(e[s]) for e in all_entries) / len(all_entries) for s in range(len(avg))],
               "requests": records}
    (out_dir / "depth_attention.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    draw(avg, f"{model}: depth weights averaged over {len(all_entries)} tokens", out_dir / "depth_mean.png")
    first = records[0]
    idx = token_index if token_index >= 0 else len(first["depth_attention"]) + token_index
    draw(first["depth_attention"][idx], f"{model}: token {idx} {first['tokens'][idx]!r}", out_dir / "depth_token.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = FriendlyParser(prog="depthserve inspect", description=__doc__)
    ap.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="same as --model")
    ap.add_argument("--model", default=EngineArgs.model, help="an AttnRes model folder, .gguf file or built-in name")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts-file", type=Path, help="a file with one prompt per line")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens to generate after each prompt")
    ap.add_argument("--token-index", type=int, default=-1, help="which token of the first prompt to draw alone")
    ap.add_argument("--dtype", default=EngineArgs.dtype, choices=list(DTYPE_CHOICES),
                    help="weight/activation dtype (auto: the checkpoint's)")
    ap.add_argument("--out-dir", type=Path, default=Path("depth_inspect"), help="where the JSON and PNGs go")
    a = ap.parse_args(argv)
    if a.model_tag is not None:
        a.model = a.model_tag
    if importlib.util.find_spec("matplotlib") is None:  # before the model runs, not after
        ap.exit(2, f"depthserve inspect: error: the heatmaps need matplotlib: {MATPLOTLIB_INSTALL}\n")
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [ln for ln in a.prompts_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        ap.error("give at least one --prompt or a --prompts-file")
    try:
        summary = inspect(a.model, prompts, a.out_dir, a.max_tokens, a.token_index, a.dtype)
    except (ValueError, FileNotFoundError) as e:
        ap.exit(2, f"depthserve inspect: error: {e}\n")
    print(f"wrote {a.out_dir}/depth_attention.json, depth_mean.png, depth_token.png "
          f"({sum(len(r['depth_attention']) for r in summary['requests'])} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
