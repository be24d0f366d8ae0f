"""Bounded soak with overload: loadtest/soak.py in its own process against a real server on 127.0.0.1.

About 20 s: mixed streaming / non-streaming completions and chat with deliberate hang-ups, 24 extra
clients for the first 40% of the run against a queue bound of 4 (429s), then a load the server can take.
Afterwards nothing may be left behind: no request running or waiting, no KV block held by a request, no
depth row reserved, no request failed (only deliberate 429s and hang-ups), and the server's RSS grew by
less than RSS_GROWTH_MIB over the run (after a short warm-up run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.soak import verdict
from tests.server.conftest import REPO, ServerProcess, metric, scrape, wait_for_metric

P = "depthserve:"
SOAK_SECONDS = 15
RSS_GROWTH_MIB = 32


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def run_soak(url: str, seconds: float, seed: int) -> dict:
    cmd = [sys.executable, "-m", "loadtest.soak", "--url", url, "--duration", str(seconds), "--seed", str(seed),
           "--timeout", "20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 60)
    assert r.stdout.strip(), r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, summary
    return summary


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_soak_with_overload_leaves_nothing_behind(tiny_model: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_model, "--max-num-seqs", "4", "--max-queued-requests", "4", log_dir=tmp_path) as srv:
        run_soak(srv.url, 3, seed=1)  # warm-up: allocator pools, caches, every code path once
        before = rss_kib(srv.proc.pid)
        s = run_soak(srv.url, SOAK_SECONDS, seed=0)
        growth_mib = (rss_kib(srv.proc.pid) - before) / 1024
        print(f"\nsoak: {json.dumps(s)}; RSS {before / 1024:.0f} MiB, growth {growth_mib:+.1f} MiB")

        assert s["failed"] == 0 and s["late_429"] == 0 and s["verdict"] == "pass", s
        assert s["rejected_429"] > 0 and s["hangups"] > 0 and s["ok"] > 50, s
        assert s["overload"]["first_429_at_clients"] is not None, s  # the queue bound was found
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_held",
                     "depth_cache_rows_in_use"):
            assert wait_for_metric(srv.url, P + name, lambda v: v == 0) == 0, name
        samples = scrape(srv.url)
        assert metric(samples, P + "request_success_total", finished_reason="error") == 0
        assert metric(samples, P + "request_success_total", finished_reason="abort") > 0  # hang-ups were aborted
        assert growth_mib < RSS_GROWTH_MIB, f"server RSS grew {growth_mib:.1f} MiB"
        assert srv.proc.poll() is None
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def summary(**kw: object) -> dict:
    base = {"requests": 100, "seconds": 20.0, "ok": 90, "rejected_429": 0, "hangups": 10, "failed": 0, "late_429": 0,
            "failures": [], "overload": {"clients": 192, "first_429_at_clients": None, "peak_running": 64,
                                         "peak_waiting": 120}}
    return {**base, **kw}


def test_verdict_says_what_to_set_when_the_bound_is_never_reached() -> None:
    ok, lines = verdict(summary(), 192)
    assert ok and lines[0].startswith("soak: PASS")
    assert "no 429 up to 192 concurrent clients" in lines[1] and "--max-queued-requests" in lines[1]
    ok, lines = verdict(summary(rejected_429=5, overload={"clients": 48, "first_429_at_clients": 48,
                                                          "peak_running": 4, "peak_waiting": 4}), 192)
    assert ok and "answered 429 at 48 concurrent clients" in lines[1]
    ok, lines = verdict(summary(failed=1, failures=["500:boom"], late_429=2), 192)
    assert not ok and lines[0].startswith("soak: FAIL") and "FAIL, 2 requests" in lines[2] and "500:boom" in lines[3]
