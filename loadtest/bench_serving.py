"""Online serving benchmark against a running OpenAI-compatible server (asyncio + httpx).

Sends `--num-prompts` requests with random input/output lengths (`ignore_eos` + `max_tokens`, so output
lengths are exact), either at a fixed concurrency (`--concurrency N`, closed loop) or as Poisson arrivals
(`--request-rate R` req/s, optionally capped by `--concurrency`), and reports TTFT, TPOT, ITL and
end-to-end latency (mean / p50 / p90 / p99), request and token throughput, goodput against SLOs and
failures, like vLLM's benchmark_serving.

    depthserve serve --num-threads 1 &
    depthserve bench serving --num-prompts 64 --concurrency 8 --input-len 64 --output-len 32 \\
        --slo-ttft-ms 500 --slo-tpot-ms 100 --out bench_out/serving.json

Several models behind one server (`depthserve serve --model A --model B`): `--model A B` sends the same
request stream to each (the same lengths and prompts, drawn once per seed), interleaved: the stream is cut
into `--rounds` parts and each part goes to every model in turn (A B, then B A, ...), so drift on a noisy
machine falls on both. It prints each model's report and a side-by-side table; `--out` has them all.

Definitions (streaming): TTFT is the time to the first chunk carrying generated text; TPOT is
(latency - TTFT) / (output tokens - 1); ITL is every gap between successive text chunks; output tokens
come from the server's usage (`stream_options.include_usage`). Without `--stream`, only end-to-end
latency is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# Source text for prompts: tokenized once through the server's /tokenize (a pool of valid token ids).
CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. "
    "All the world's a stage, and all the men and women merely players; they have their exits and their "
    "entrances, and one man in his time plays many parts. Now is the winter of our discontent made glorious "
    "summer by this sun of York. Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not "
    "to praise him. What light through yonder window breaks? It is the east, and Juliet is the sun. "
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
)
PERCENTILES = (50, 90, 99)


class BenchError(Exception):
    """A setup problem (server unreachable, no /tokenize for token prompts): one line, exit status 2."""


@dataclass
class RequestSpec:
    """One request to send: its prompt (token ids or text) and the lengths asked for."""

    prompt: list[int] | str
    input_len: int
    output_len: int


@dataclass
class RequestResult:
    """What one request measured; times in seconds relative to its own start."""

    input_len: int
    output_len: int
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---- workload ---------------------------------------------------------------------------------------


def sample_lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """n lengths uniform in [mean*(1-r), mean*(1+r)], at least 1."""
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


async def token_pool(client: httpx.AsyncClient, model: str | None) -> list[int]:
    """Distinct token ids of CORPUS as the server's tokenizer sees it (its /tokenize route; llama-server's
    takes the text as "content", and answers an empty list to vLLM's "prompt")."""
    body: dict[str, Any] = {"prompt": CORPUS, "add_special_tokens": False}
    if model:
        body["model"] = model
    r = await client.post("/tokenize", json=body)
    r.raise_for_status()
    tokens = r.json()["tokens"]
    if not tokens:
        r = await client.post("/tokenize", json={"content": CORPUS, "add_special": False})
        r.raise_for_status()
        tokens = r.json()["tokens"]
    return sorted(set(tokens))


async def build_requests(client: httpx.AsyncClient, args: argparse.Namespace, model: str | None
                         ) -> list[RequestSpec]:
    """Random prompts: token ids drawn from the pool, or (text / chat) those ids detokenized."""
    rng = random.Random(args.seed)
    in_lens = sample_lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    out_lens = sample_lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    text = args.prompt_type == "text" or args.endpoint == "chat"
    try:
        pool = await token_pool(client, model)
    except (httpx.HTTPError, KeyError, ValueError) as e:
        if not text:
            raise BenchError(f"/tokenize failed ({_describe(e)}); use --prompt-type text") from None
        pool = []
    specs = []
    words = CORPUS.split()
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
        if pool:
            ids = [rng.choice(pool) for _ in range(n_in)]
            prompt: list[int] | str = ids
            if text:
                named = {"model": model} if model else {}
                try:
                    r = await client.post("/detokenize", json={"tokens": ids, **named})
                    r.raise_for_status()
                    got = r.json()
                    prompt = got.get("prompt", got.get("content")) or f"prompt {i}"  # llama-server: "content"
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    raise BenchError(f"/detokenize failed ({_describe(e)})") from None
        else:  # no /tokenize: about one token per word
            prompt = " ".join(rng.choice(words) for _ in range(n_in))
        specs.append(RequestSpec(prompt, n_in, n_out))
    return specs


def payload(spec: RequestSpec, args: argparse.Namespace, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": spec.output_len, "ignore_eos": True, "temperature": args.temperature,
                            "stream": args.stream}
    if model:
        body["model"] = model
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


# ---- one request ------------------------------------------------------------------------------------


def _http_error(status: int, body: bytes | str) -> str:
    """'HTTP 400: message' from an OpenAI-style error body (or the body's start)."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = json.loads(text)["error"]["message"]
    return f"HTTP {status}: {text}"[:200]


def _describe(e: Exception) -> str:
    """One line about a failed call."""
    if isinstance(e, httpx.HTTPStatusError):
        return _http_error(e.response.status_code, e.response.text)
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _chunk_text(event: dict[str, Any]) -> str:
    text = ""
    for choice in event.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def send(client: httpx.AsyncClient, path: str, spec: RequestSpec, body: dict[str, Any],
               stream: bool) -> RequestResult:
    """Send one request, timing the SSE chunks when streaming; never raises."""
    res = RequestResult(spec.input_len, spec.output_len)
    start = time.perf_counter()
    res.start = start
    last = start
    chunks = 0
    try:
        if not stream:
            r = await client.post(path, json=body)
            res.latency = time.perf_counter() - start
            if r.status_code != 200:
                res.error = _http_error(r.status_code, r.content)
                return res
            usage = r.json().get("usage") or {}
            res.prompt_tokens = usage.get("prompt_tokens")
            res.output_tokens = int(usage.get("completion_tokens", 0))
            res.ok = True
            return res
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = _http_error(r.status_code, await r.aread())
                res.latency = time.perf_counter() - start
                return res
            usage = None
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {(event['error'] or {}).get('message', event['error'])}"[:200]
                    break
                if event.get("usage"):
                    usage = event["usage"]
                if _chunk_text(event):
                    chunks += 1
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
            res.latency = time.perf_counter() - start
            if res.error is None and not done:
                res.error = "stream ended without [DONE]"
            if res.error is not None:
                return res
            if res.ttft is None:  # no text at all (e.g. only special tokens): first token == last
                res.ttft = res.latency
            res.prompt_tokens = usage.get("prompt_tokens") if usage else None
            res.output_tokens = int(usage["completion_tokens"]) if usage else chunks
            res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        res.latency = time.perf_counter() - start
        res.error = _describe(e)
    return res


# ---- the run ----------------------------------------------------------------------------------------


async def run(client: httpx.AsyncClient, specs: list[RequestSpec], args: argparse.Namespace,
              model: str | None) -> tuple[list[RequestResult], float]:
    """Dispatch all requests (Poisson or back-to-back arrivals, capped in flight); (results, duration)."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    rng = random.Random(args.seed + 1)

    async def one(spec: RequestSpec) -> RequestResult:
        if sem is None:
            return await send(client, path, spec, payload(spec, args, model), args.stream)
        async with sem:
            return await send(client, path, spec, payload(spec, args, model), args.stream)

    start = time.perf_counter()
    tasks = []
    for i, spec in enumerate(specs):
        if i and args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
        tasks.append(asyncio.create_task(one(spec)))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    for r in results:
        r.start -= start
    return results, duration


def stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    """mean and percentiles in ms of values in seconds (None when there are none)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace,
              model: str | None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)
    slo = {k: v for k, v in (("ttft_ms", args.slo_ttft_ms), ("tpot_ms", args.slo_tpot_ms),
                              ("e2e_ms", args.slo_e2e_ms)) if v is not None}

    def meets(r: RequestResult) -> bool:
        vals = {"ttft_ms": r.ttft, "tpot_ms": r.tpot if r.output_tokens > 1 else 0.0, "e2e_ms": r.latency}
        return all((v := vals[k]) is not None and v * 1000.0 <= limit for k, limit in slo.items())

    good = sum(meets(r) for r in ok)
    return {
        "config": {**{k: (None if v == float("inf") else str(v) if isinstance(v, Path) else v)
                      for k, v in vars(args).items() if k != "api_key"}, "model": model},
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if r.error).most_common(10)),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itl]),
        "e2e_ms": stats_ms([r.latency for r in ok]),
        "goodput": {"slo": slo, "good_requests": good, "fraction": good / len(results) if results else 0.0,
                    "rate": good / duration if duration else 0.0} if slo else None,
        "requests": [{**{k: v for k, v in asdict(r).items() if k != "itl"}, "tpot": r.tpot, "itl": r.itl}
                     for r in results],
    }


def format_summary(s: dict[str, Any]) -> str:
    """A readable report in the shape of vLLM's benchmark_serving."""
    lines = [f"{' Serving Benchmark Result ':=^60}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "n/a" if value is None else format(value, fmt)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration_s"], ".2f")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", s["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", s["total_token_throughput"], ".2f")
    if s["goodput"] is not None:
        g = s["goodput"]
        lines.append(f"SLO: {', '.join(f'{k} <= {v:g}' for k, v in g['slo'].items())}")
        row("Request goodput (req/s):", g["rate"], ".2f")
        row("Requests meeting all SLOs (%):", 100.0 * g["fraction"], ".1f")
    for key, title, name in (("ttft_ms", "Time to First Token", "TTFT"),
                             ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl_ms", "Inter-token Latency", "ITL"),
                             ("e2e_ms", "End-to-end Latency", "E2EL")):
        lines.append(f"{' ' + title + ' ':-^60}")
        st = s[key]
        row(f"Mean {name} (ms):", st["mean"], ".2f")
        row(f"Median {name} (ms):", st["p50"], ".2f")
        for p in PERCENTILES[1:]:
            row(f"P{p} {name} (ms):", st[f"p{p}"], ".2f")
    if s["errors"]:
        lines.append(f"{' Errors ':-^60}")
        lines += [f"{n:>5} x {msg}" for msg, n in s["errors"].items()]
    lines.append("=" * 60)
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n = args.concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0)) as client:
        try:
            r = await client.get("/v1/models")
            r.raise_for_status()
            cards = r.json().get("data", [])
        except (httpx.HTTPError, KeyError, ValueError) as e:
            print(f"bench_serving: error: cannot list models at {args.base_url}/v1/models: {_describe(e)}",
                  file=sys.stderr)
            return 2
        served = [c["id"] for c in cards]
        wanted = args.model or [served[0] if served else None]
        unknown = [m for m in wanted if m is not None and served and m not in served]
        if unknown:
            print(f"bench_serving: error: model {unknown[0]!r} is not served (served: {', '.join(served)})",
                  file=sys.stderr)
            return 2
        for model in wanted:
            max_len = next((c.get("max_model_len") for c in cards if c["id"] == model), None)
            if max_len and (args.input_len + args.output_len) * (1 + args.range_ratio) > max_len:
                print(f"bench_serving: warning: the longest requests may exceed {model}'s max_model_len={max_len}",
                      file=sys.stderr)
        try:
            specs = {m: await build_requests(client, args, m) for m in wanted}
        except BenchError as e:
            print(f"bench_serving: error: {e}", file=sys.stderr)
            return 2
        if args.request_rate != float("inf"):
            mode = f"Poisson arrivals at {args.request_rate:g} req/s"
            cap = f", at most {args.concurrency} in flight" if args.concurrency else ""
        else:
            mode = f"fixed concurrency {args.concurrency}" if args.concurrency else "all at once"
            cap = ""
        print(f"bench_serving: {args.num_prompts} requests to {args.base_url} ({', '.join(map(str, wanted))}, "
              f"{args.endpoint}, {'streaming' if args.stream else 'not streaming'}), {mode}{cap}", file=sys.stderr)
        results, durations = await run_interleaved(client, specs, args)
    summaries = {m: summarize(results[m], durations[m], args, m) for m in wanted}
    for m, summary in summaries.items():
        if len(wanted) > 1:
            print(f"model: {m}")
        print(format_summary(summary))
    if len(wanted) > 1:
        print(side_by_side(summaries))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = summaries[wanted[0]] if len(wanted) == 1 else {"models": summaries}
        args.out.write_text(json.dumps(body, indent=1))
    return 0 if all(s["completed"] for s in summaries.values()) else 1


async def run_interleaved(client: httpx.AsyncClient, specs: dict[str | None, list[RequestSpec]],
                          args: argparse.Namespace) -> tuple[dict, dict]:
    """Each model's requests in `--rounds` parts, the models in turn per part (reversed every other round);
    per model: its results, and the time its parts took."""
    models = list(specs)
    if len(models) == 1:
        results, duration = await run(client, specs[models[0]], args, models[0])
        return {models[0]: results}, {models[0]: duration}
    n = len(next(iter(specs.values())))
    rounds = max(1, min(args.rounds, n))
    bounds = [n * k // rounds for k in range(rounds + 1)]
    results: dict = {m: [] for m in models}
    durations: dict = {m: 0.0 for m in models}
    for k in range(rounds):
        for m in (models if k % 2 == 0 else models[::-1]):
            part, duration = await run(client, specs[m][bounds[k]:bounds[k + 1]], args, m)
            results[m] += part
            durations[m] += duration
    return results, durations


def side_by_side(summaries: dict[str | None, dict[str, Any]]) -> str:
    """Medians and throughput of each model, one column each (Markdown)."""
    names = list(summaries)
    lines = ["| | " + " | ".join(map(str, names)) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, get: Any, fmt: str) -> None:
        cells = []
        for m in names:
            v = get(summaries[m])
            cells.append("n/a" if v is None else format(v, fmt))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("completed", lambda s: s["completed"], "d")
    row("output tok/s", lambda s: s["output_throughput"], ".1f")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2EL")):
        row(f"median {label} ms", lambda s, key=key: s[key]["p50"], ".2f")
        row(f"P99 {label} ms", lambda s, key=key: s[key]["p99"], ".2f")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from engine.arg_utils import FriendlyParser

    p = FriendlyParser(prog="depthserve bench serving", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", nargs="+", default=None, metavar="MODEL",
                   help="model name(s) to send (None: the first of /v1/models); several: the same requests to each, "
                        "interleaved")
    p.add_argument("--rounds", type=int, default=4,
                   help="with several --model: parts the request stream is cut into, each sent to every model in turn")
    p.add_argument("--api-key", default=None, help="bearer token (None: $DEPTHSERVE_API_KEY if set)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    p.add_argument("--concurrency", type=int, default=None,
                   help="most requests in flight at once (alone: a closed loop at this concurrency)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in req/s (inf: all requests at once, capped by --concurrency)")
    p.add_argument("--input-len", type=int, default=64, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, default=32,
                   help="mean output length in tokens (exact per request)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--prompt-type", choices=["tokens", "text"], default="tokens",
                   help="completions prompts as token ids or as text (chat always sends text)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream (SSE) and measure TTFT/TPOT/ITL")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on time to first token")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on time per output token")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput SLO on end-to-end latency")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, prompts and arrivals")
    p.add_argument("--out", type=Path, default=None, help="write the results (with per-request data) as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.api_key = args.api_key or os.environ.get("DEPTHSERVE_API_KEY") or None
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            print(f"bench_serving: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("bench_serving: error: --concurrency must be >= 1", file=sys.stderr)
        return 2
    if not args.request_rate > 0 or not 0 <= args.range_ratio < 1:
        print("bench_serving: error: --request-rate must be > 0 and --range-ratio in [0, 1)", file=sys.stderr)
        return 2
    if not args.stream and (args.slo_ttft_ms is not None or args.slo_tpot_ms is not None):
        print("bench_serving: error: TTFT/TPOT SLOs need --stream", file=sys.stderr)
        return 2
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
