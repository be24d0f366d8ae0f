"""`depthserve eval perplexity`: the perplexity of one or more models on a text file, through the engine's prompt
logprobs (the same path a served model scores prompts on, so it measures what is served).

    depthserve eval perplexity --model shakespeare-attnres --model shakespeare-residual --file heldout.txt

The text is tokenized without special tokens and preceded by the BOS token (EOS when the model has none), as
lm-evaluation-harness's rolling loglikelihood does; every text token is scored once. Sliding windows of at most
--max-length tokens each score --stride new tokens with the tokens before them in the window as context (the
first window scores max_length - 1 tokens). The default stride, max_length - 1, gives disjoint windows with
one token of context (lm-evaluation-harness's scheme); a smaller stride gives later windows more context, at
the cost of more windows. perplexity = exp(total NLL / tokens); bits_per_byte = total NLL / ln 2 / UTF-8 bytes
of the text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from engine.llm_engine import LLM
from engine.outputs import RequestOutputKind
from engine.sampling_params import SamplingParams

EXIT_USAGE = 2


@dataclass(frozen=True)
class PerplexityResult:
    model: str
    perplexity: float
    bits_per_byte: float
    tokens: int  # scored tokens (every token of the text)


def windows(num_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, first scored, end) per window over a sequence of num_tokens + 1 (the prefix token first): the
    window is positions [start, end), and positions [first scored, end) are scored (each once, in order)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a token of context and one to score), got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    scored, total = 1, num_tokens + 1
    while scored < total:
        end = min(max(scored + stride, max_length), total)
        yield max(0, end - max_length), scored, end
        scored = end


def perplexity(llm: LLM, text: str, name: str, max_length: int | None = None, stride: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Score `text` with the model behind `llm`; `progress(done, total)` is called as windows finish."""
    engine = llm.engine
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{name} has no tokenizer: perplexity on a text needs one")
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise ValueError(f"{name}'s tokenizer has neither a BOS nor an EOS token to start the text with")
    ids = [prefix, *tok.encode(text, add_special_tokens=False)]
    if len(ids) < 2:
        raise ValueError(f"the text has no tokens for {name} to score")
    limit = engine.max_model_len - 1  # a window is a prompt that still samples one token
    length = limit if max_length is None else max_length
    if length > limit:
        raise ValueError(f"max_length {length} exceeds what {name} can score at once ({limit}: its context "
                         f"length {engine.max_model_len} minus the one token each window generates)")
    plan = list(windows(len(ids) - 1, length, length - 1 if stride is None else stride))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for k, (start, _, end) in enumerate(plan):
        engine.add_request({"prompt_token_ids": ids[start:end]}, params, f"ppl-{k}")
    nll, done = 0.0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None or out.prompt_logprobs is None:
                raise RuntimeError(f"scoring window {out.request_id} failed: {out.error or 'no prompt logprobs'}")
            start, scored, end = plan[int(out.request_id.rsplit("-", 1)[1])]
            nll -= sum(lp.logprob for lp in out.prompt_logprobs[scored - start:end - start])  # type: ignore[union-attr]
            done += 1
            if progress is not None:
                progress(done, len(plan))
    n = len(ids) - 1
    return PerplexityResult(name, math.exp(nll / n), nll / math.log(2) / len(text.encode("utf-8")), n)


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); plain lines at 25% steps otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        frac = done / total
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{total} windows, {time.monotonic() - self.t0:.0f} s")
            if done == total:
                self.stream.write("\n")
        elif int(frac * 4) > self._shown:  # 0%, 25%, ... in a log
            self._shown = int(frac * 4)
            self.stream.write(f"{self.label}: {done}/{total} windows\n")
        self.stream.flush()


def table(results: Sequence[PerplexityResult]) -> str:
    """A Markdown table, one row per model."""
    rows = ["| model | perplexity | bits/byte | tokens |", "|---|---|---|---|"]
    rows += [f"| {r.model} | {r.perplexity:.3f} | {r.bits_per_byte:.4f} | {r.tokens} |" for r in results]
    return "\n".join(rows)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    from engine.arg_utils import EngineArgs

    p = sub.add_parser("perplexity", help="perplexity and bits per byte of models on a text file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="a model folder or built-in name (repeat to compare models; scored one after another)")
    p.add_argument("--file", type=Path, required=True, help="the UTF-8 text to score")
    p.add_argument("--max-length", type=int, help="tokens per window (default: the model's context length - 1)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: max-length - 1)")
    p.add_argument("--dtype", default=EngineArgs.dtype, help="weight/activation dtype")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--device", default=EngineArgs.device, help="cpu, cuda or auto")
    p.add_argument("--num-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quantization", nargs="+", default=[EngineArgs.quantization], metavar="Q",
                   help="weights served quantized (auto, none, int8, q8_0, q4_0, q4_1); several values score each "
                        "model once per value, e.g. `--quantization none int8 q4_0` for the cost of quantizing")
    p.add_argument("--quant-activations", nargs="+", default=[EngineArgs.quant_activations], metavar="A",
                   choices=["int8", "none"], help="activations of the quantized linears (int8, none); several "
                                                  "values score each model and --quantization once per value")
    p.add_argument("--output-json", type=Path, help='also write [{"model", "perplexity", "bits_per_byte", '
                                                    '"tokens"}, ...] here')
    return p


def run(ns: argparse.Namespace) -> int:
    try:
        text = ns.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _usage(f"cannot read --file {ns.file}: {e}")
    if not text:
        return _usage(f"--file {ns.file} is empty: nothing to score")
    results = []
    quants = list(dict.fromkeys(ns.quantization))
    acts = list(dict.fromkeys(ns.quant_activations))
    for model, q, a in ((m, q, a) for m in ns.model for q in quants for a in acts):
        tags = [t for t, many in ((q, len(quants) > 1), (f"activations {a}", len(acts) > 1)) if many]
        name = Path(model).name + (f" [{', '.join(tags)}]" if tags else "")
        try:
            llm = LLM(model, dtype=ns.dtype, max_model_len=ns.max_model_len, device=ns.device,
                      num_threads=ns.num_threads, quantization=q, quant_activations=a)
        except (ValueError, OSError) as e:
            return _usage(f"cannot load {model}: {e}")
        try:
            results.append(perplexity(llm, text, name, ns.max_length, ns.stride, ProgressBar(name)))
        except ValueError as e:
            return _usage(str(e))
        finally:
            llm.shutdown()
            del llm
    print(table(results))
    if ns.output_json is not None:
        ns.output_json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    return 0


def _usage(message: str) -> int:
    print(f"depthserve eval: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """`depthserve eval COMMAND ...` (forwarded by server.cli)."""
    ap = argparse.ArgumentParser(prog="depthserve eval", description="quality of served models, through the engine")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser(sub)
    ns = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run(ns)


if __name__ == "__main__":
    raise SystemExit(main())
