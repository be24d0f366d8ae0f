"""Bounded soak / overload run against a depthserve server: mixed traffic, client disconnects, a 429 phase.

    depthserve soak --url http://127.0.0.1:8000 --duration 20 --model shakespeare-attnres

For the first `--overload-fraction` of the run, `--overload-workers` extra clients send back to back,
doubling every quarter of that phase (up to `--max-overload-workers`) until the server answers 429: the
summary says at how many clients its queue bound was reached, or, if it never was, what to set to reach
it. Then `--workers` clients keep a load the server can take, and the run checks that it recovers (no 429
after `--grace` seconds). Each client mixes streaming and non-streaming completions and chat, and some
hang up on purpose (mid-stream, or before a non-streaming answer). Prints a PASS/FAIL summary on stderr
and one JSON line on stdout; exits 1 if any request failed other than by a deliberate 429 or hang-up, or
429s went on after the overload. It stops by itself: no new request after `--duration`, every request
capped by `--timeout`. Aimed at your own server: non-loopback hosts are refused unless `--allow-remote`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

PROMPTS = ["To be, or not to be", "All the world's a stage", "Friends, Romans, countrymen", "Now is the winter",
           "lend me your ears", "the slings and arrows of outrageous fortune"]
KINDS = ("completion", "completion_stream", "chat", "chat_stream", "hangup_stream", "hangup_wait")
WEIGHTS = (3, 3, 2, 2, 1, 1)


@dataclass
class Tally:
    """Outcomes by phase; `failures` keeps a few examples of what went wrong."""

    outcomes: Counter[str] = field(default_factory=Counter)
    late_429: int = 0  # 429s in the calm phase after the grace period: the server did not recover
    tokens: int = 0
    first_429_at_clients: int | None = None  # overload clients running when the first 429 came
    overload_clients: int = 0  # the most overload clients that ran at once
    peak_running: float = 0.0  # from /metrics during the overload, when readable
    peak_waiting: float = 0.0
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.outcomes["failed"] += 1
        if len(self.failures) < 10:
            self.failures.append(what[:300])


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _stream(c: httpx.AsyncClient, path: str, body: dict, hangup_after: int | None, tally: Tally) -> str:
    """Read an SSE response; 'ok', 'hangup' (closed on purpose) or a failure description."""
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return f"{r.status_code}:{r.text[:200]}"
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return "ok"
            event = json.loads(data)
            if "error" in event:
                return f"error event: {data[:200]}"
            events += 1
            tally.tokens += 1
            if hangup_after is not None and events >= hangup_after:
                return "hangup"  # leaving the block closes the connection mid-stream
        return "stream ended without [DONE]"


async def one_request(c: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally) -> str:
    kind = rng.choices(KINDS, WEIGHTS)[0]
    max_tokens = rng.randint(1, 32)
    common = {"model": model, "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]),
              "seed": rng.randint(0, 1000), "ignore_eos": rng.random() < 0.5}
    prompt = rng.choice(PROMPTS)
    chat = {**common, "messages": [{"role": "user", "content": prompt}]}
    completion = {**common, "prompt": prompt}
    if kind in ("completion_stream", "chat_stream", "hangup_stream"):
        path, body = ("/v1/chat/completions", chat) if kind == "chat_stream" else ("/v1/completions", completion)
        hangup = rng.randint(1, 3) if kind == "hangup_stream" else None
        return await _stream(c, path, {**body, "stream": True, "max_tokens": 32 if hangup else max_tokens},
                             hangup, tally)
    path, body = ("/v1/chat/completions", chat) if kind == "chat" else ("/v1/completions", completion)
    if kind == "hangup_wait":  # give up before the answer: the server must abort the request
        try:
            await asyncio.wait_for(c.post(path, json={**body, "max_tokens": 32}), rng.uniform(0.005, 0.1))
        except TimeoutError:
            return "hangup"
        return "ok"
    r = await c.post(path, json=body)
    if r.status_code == 200:
        tally.tokens += r.json()["usage"]["completion_tokens"]
        return "ok"
    return f"{r.status_code}:{r.text[:200]}"


async def worker(c: httpx.AsyncClient, rng: random.Random, model: str, stop_at: float, active: asyncio.Event,
                 tally: Tally, calm_since: list[float], grace: float) -> None:
    while time.monotonic() < stop_at:
        await active.wait()
        if time.monotonic() >= stop_at:
            return
        try:
            result = await one_request(c, rng, model, tally)
        except httpx.HTTPError as e:
            result = f"transport: {type(e).__name__}: {e}"
        if result in ("ok", "hangup"):
            tally.outcomes[result] += 1
        elif result.startswith("429:"):
            tally.outcomes["429"] += 1
            if calm_since and time.monotonic() > calm_since[0] + grace:
                tally.late_429 += 1
            await asyncio.sleep(0.05)
        else:
            tally.fail(result)


async def overload(c: httpx.AsyncClient, rng: random.Random, model: str, end: float, first: int, cap: int,
                   tally: Tally) -> None:
    """Start `first` back-to-back clients, doubling every quarter of the phase up to `cap`, until a 429."""
    tasks: list[asyncio.Future[None]] = []
    go = asyncio.Event()
    go.set()
    target, step = max(first, 0), (end - time.monotonic()) / 4
    while time.monotonic() < end:
        while len(tasks) < target:
            tasks.append(asyncio.ensure_future(worker(c, random.Random(rng.random()), model, end, go, tally, [], 0)))
        tally.overload_clients = len(tasks)
        deadline = min(end, time.monotonic() + step)
        while time.monotonic() < deadline and not tally.outcomes["429"]:
            await asyncio.sleep(0.05)
        if tally.outcomes["429"]:
            if tally.first_429_at_clients is None:
                tally.first_429_at_clients = len(tasks)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            break
        target = min(cap, target * 2)
    await asyncio.gather(*tasks)


async def watch_load(c: httpx.AsyncClient, tally: Tally, until: float) -> None:
    """Peak running / waiting requests from /metrics (best effort: a protected /metrics reads as nothing)."""
    while time.monotonic() < until:
        try:
            text = (await c.get("/metrics", timeout=2.0)).text
        except httpx.HTTPError:
            text = ""
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            try:
                if name.startswith("depthserve:num_requests_running"):
                    tally.peak_running = max(tally.peak_running, float(value))
                elif name.startswith("depthserve:num_requests_waiting"):
                    tally.peak_waiting = max(tally.peak_waiting, float(value))
            except ValueError:
                pass
        await asyncio.sleep(0.25)


def verdict(summary: dict, max_overload_workers: int) -> tuple[bool, list[str]]:
    """PASS/FAIL and the lines that explain it (the overload's finding included, or what to set)."""
    ok = not summary["failed"] and not summary["late_429"]
    lines = [f"soak: {'PASS' if ok else 'FAIL'} ({summary['requests']} requests in {summary['seconds']} s: "
             f"{summary['ok']} ok, {summary['rejected_429']} rejected with 429, {summary['hangups']} hung up on "
             f"purpose, {summary['failed']} failed)"]
    o = summary["overload"]
    load = f"peak {o['peak_running']:g} running, {o['peak_waiting']:g} waiting"
    if o["first_429_at_clients"] is not None:
        lines.append(f"  overload: the server's queue bound answered 429 at {o['first_429_at_clients']} concurrent "
                     f"clients ({load})")
    else:
        lines.append(f"  overload: no 429 up to {o['clients']} concurrent clients ({load}): the queue bound was not "
                     "reached. Start the server with a small --max-queued-requests (e.g. `depthserve serve "
                     "--max-queued-requests 8`), or raise --max-overload-workers above the server's --max-num-seqs "
                     f"+ --max-queued-requests (defaults 64 + 1024; now {max_overload_workers})")
    lines.append("  recovery: " + (f"FAIL, {summary['late_429']} requests got 429 after the overload ended"
                                   if summary["late_429"] else "ok, no 429 once the overload ended"))
    if summary["failed"]:
        lines.append(f"  failures: {summary['failed']}, e.g. " + "; ".join(summary["failures"][:3]))
    return ok, lines


async def soak(url: str, model: str, duration: float, overload_fraction: float, overload_workers: int,
               workers: int, grace: float, timeout: float, api_key: str | None, seed: int,
               max_overload_workers: int | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cap = max(overload_workers, max_overload_workers or overload_workers)
    limits = httpx.Limits(max_connections=cap + workers + 1, max_keepalive_connections=workers + 1)
    tally = Tally()
    rng = random.Random(seed)
    t0 = time.monotonic()
    stop_at = t0 + duration
    calm_since: list[float] = []
    always = asyncio.Event()
    always.set()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as c:
        tasks = [asyncio.ensure_future(worker(c, random.Random(rng.random()), model, stop_at, always, tally,
                                              calm_since, grace)) for _ in range(workers)]
        overload_end = t0 + duration * overload_fraction
        watcher = asyncio.ensure_future(watch_load(c, tally, overload_end))
        await overload(c, random.Random(rng.random()), model, overload_end, overload_workers, cap, tally)
        await watcher
        calm_since.append(time.monotonic())
        await asyncio.gather(*tasks)
    out = tally.outcomes
    return {"seconds": round(time.monotonic() - t0, 2), "requests": sum(out.values()), "ok": out["ok"],
            "rejected_429": out["429"], "late_429": tally.late_429, "hangups": out["hangup"],
            "failed": out["failed"], "streamed_or_generated_tokens": tally.tokens, "failures": tally.failures,
            "overload": {"clients": tally.overload_clients, "first_429_at_clients": tally.first_429_at_clients,
                         "peak_running": tally.peak_running, "peak_waiting": tally.peak_waiting}}


def main(argv: Sequence[str] | None = None) -> int:
    from engine.arg_utils import FriendlyParser

    p = FriendlyParser(prog="depthserve soak", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server to soak")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds during which requests start")
    p.add_argument("--overload-fraction", type=float, default=0.4, help="leading share of the run overloaded")
    p.add_argument("--overload-workers", type=int, default=24, help="extra clients at the start of the overload")
    p.add_argument("--max-overload-workers", type=int, default=192,
                   help="the overload doubles its clients up to this many until the server answers 429")
    p.add_argument("--workers", type=int, default=3, help="clients for the whole run")
    p.add_argument("--grace", type=float, default=2.0, help="seconds after the overload before 429s count late")
    p.add_argument("--timeout", type=float, default=30.0, help="cap on any one request")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    a = p.parse_args(argv)
    if not is_loopback(a.url) and not a.allow_remote:
        p.error(f"{a.url} is not a loopback address: soak only your own server (or pass --allow-remote)")
    model = a.model
    if model is None:
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        model = httpx.get(a.url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    summary = asyncio.run(soak(a.url, model, a.duration, a.overload_fraction, a.overload_workers, a.workers,
                               a.grace, a.timeout, a.api_key, a.seed, a.max_overload_workers))
    ok, lines = verdict(summary, a.max_overload_workers)
    summary["verdict"] = "pass" if ok else "fail"
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
