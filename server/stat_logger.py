"""The periodic stats line a vLLM operator reads in the log: throughput, queue, caches.

Runs on the event loop and reads only the engine's latest stats snapshot (as /metrics does), so it never
touches the engine thread. Logs while the server is busy, plus one line once it goes idle; nothing when
idle, so an idle server's log stays quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engine.llm_engine import EngineStats

logger = logging.getLogger("depthserve.stats")


def stats_line(prev: EngineStats, cur: EngineStats, seconds: float) -> str:
    """One line over the interval from `prev` to `cur` (vLLM's wording, plus the AttnRes depth pool)."""
    dt = max(seconds, 1e-9)
    queries = cur.prefix_cache_queries - prev.prefix_cache_queries
    hits = cur.prefix_cache_hits - prev.prefix_cache_hits
    hit_rate = f"{100.0 * hits / queries:.1f}%" if queries else "n/a"
    line = (f"Avg prompt throughput: {(cur.prompt_tokens - prev.prompt_tokens) / dt:.1f} tokens/s, "
            f"Avg generation throughput: {(cur.generation_tokens - prev.generation_tokens) / dt:.1f} tokens/s, "
            f"Running: {cur.num_running} reqs, Waiting: {cur.num_waiting} reqs, "
            f"KV cache usage: {100.0 * cur.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate}")
    if cur.depth_cache_bytes:
        line += f", Depth pool usage: {100.0 * cur.depth_cache_usage:.1f}%"
    return line


def _busy(prev: EngineStats, cur: EngineStats) -> bool:
    return bool(cur.num_running or cur.num_waiting or cur.prompt_tokens != prev.prompt_tokens
                or cur.generation_tokens != prev.generation_tokens)


class StatLogger:
    """Every `interval` seconds, one stats_line while requests run or tokens moved since the last one.

    `prefix`: put before each line (a server with several models runs one StatLogger per model, each line
    starting with the model's name)."""

    def __init__(self, stats: Callable[[], EngineStats | None], interval: float = 5.0, prefix: str = "") -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self._stats = stats
        self.interval = interval
        self.prefix = prefix
        self._prev: EngineStats | None = None
        self._prev_time = time.monotonic()

    def tick(self, now: float | None = None) -> str | None:
        """Log (and return) the line for the interval ending now, if there was anything to report."""
        now = time.monotonic() if now is None else now
        cur = self._stats()
        if cur is None:
            return None
        prev, seconds = self._prev, now - self._prev_time
        self._prev, self._prev_time = cur, now
        if prev is None or not _busy(prev, cur):
            return None
        line = self.prefix + stats_line(prev, cur, seconds)
        logger.info("%s", line)
        return line

    async def run(self) -> None:
        self.tick()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # a log line must never stop the server
                logger.exception("stats logging failed")
