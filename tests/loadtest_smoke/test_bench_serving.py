"""Smoke tests of the load generators against a real tiny-model server: bench_serving and locust.

Both run in subprocesses (locust monkey-patches the standard library through gevent, so it is never
imported here).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import REPO, ServerProcess

API_KEY = "smoke-key"


@pytest.fixture(scope="module")
def bench_server(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[ServerProcess]:
    from tests.tiny import tiny_config, write_tiny

    folder = tmp_path_factory.mktemp("loadtest-model")
    write_tiny(folder, tiny_config("block", block_size=2), tokenizer_from=tokenizer_dir)
    with ServerProcess(folder, "--api-key", API_KEY, "--served-model-name", "tiny",
                       log_dir=tmp_path_factory.mktemp("loadtest-logs")) as srv:
        yield srv


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_bench_serving(bench_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "-m", "loadtest.bench_serving", "--base-url", bench_server.url,
           "--api-key", API_KEY, "--num-prompts", "8", "--concurrency", "4", "--input-len", "16",
           "--output-len", "12", "--range-ratio", "0.5", "--slo-ttft-ms", "60000", "--slo-e2e-ms", "60000",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + bench_server.log()
    assert "Serving Benchmark Result" in proc.stdout
    s = json.loads(out.read_text())
    assert (s["num_requests"], s["completed"], s["failed"]) == (8, 8, 0), s["errors"]
    assert s["config"]["concurrency"] == 4 and s["config"]["model"] == "tiny"
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = s[key]
        assert set(st) == {"mean", "p50", "p90", "p99"}
        assert all(v is not None and v >= 0 for v in st.values()), (key, st)
        assert st["p50"] <= st["p99"]
    assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert s["goodput"]["fraction"] == 1.0 and s["goodput"]["good_requests"] == 8
    reqs = s["requests"]
    assert len(reqs) == 8 and all(r["ok"] for r in reqs)
    assert len({r["output_len"] for r in reqs}) > 1  # random lengths
    for r in reqs:  # ignore_eos + max_tokens: exactly the requested lengths, counted from the usage
        assert r["output_tokens"] == r["output_len"], r
        assert r["prompt_tokens"] == r["input_len"], r  # token-id prompts
    assert s["total_output_tokens"] == sum(r["output_len"] for r in reqs)


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed (dev extra)")
def test_locust_headless(bench_server: ServerProcess, tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "-u", "4", "-r", "4", "-t", "5s", "--host", bench_server.url, "--csv", str(prefix),
           "--only-summary"]
    env = {**_env(), "DEPTHSERVE_API_KEY": API_KEY, "DEPTHSERVE_MODEL": "tiny", "DEPTHSERVE_MAX_TOKENS": "8",
           "DEPTHSERVE_PROMPT_WORDS": "10"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for path in ("/v1/completions", "/v1/chat/completions"):
        for kind in ("POST", "TTFT", "TPOT"):
            row = rows[(kind, path)]
            assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0
