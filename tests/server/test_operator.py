"""What an operator used to vLLM looks at: start-up log lines, the periodic stats line, /version, /ping,
/docs, the 401 challenge, vLLM's metric names, and the switches that quiet the log."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from engine.llm_engine import EngineStats
from server.metrics import buckets_1_2_5
from server.stat_logger import StatLogger, stats_line
from tests.server.conftest import REPO, ServerProcess, scrape

KEY = "op-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
NEW_METRICS = ["request_prompt_tokens", "request_generation_tokens", "time_per_output_token_seconds",
               "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
               "request_max_num_generation_tokens", "iteration_tokens_total", "cache_config_info"]


def stats(**kw: float) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, kv_blocks_total=10, kv_blocks_held=0,
                depth_cache_usage=0.0, depth_cache_bytes=0, depth_rows_in_use=0, prompt_tokens=0,
                generation_tokens=0, num_preemptions=0, prefix_cache_queries=0, prefix_cache_hits=0)
    return EngineStats(**{**base, **kw})  # type: ignore[arg-type]


def test_stats_line_reads_like_vllm() -> None:
    line = stats_line(stats(), stats(prompt_tokens=100, generation_tokens=50, num_running=2, num_waiting=1,
                                     kv_cache_usage=0.25, prefix_cache_queries=80, prefix_cache_hits=20,
                                     depth_cache_bytes=1, depth_cache_usage=0.5), 10.0)
    assert line == ("Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, Running: 2 reqs, "
                    "Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%, Depth pool usage: 50.0%")


def test_stat_logger_speaks_only_while_busy() -> None:
    snaps = iter([stats(), stats(), stats(generation_tokens=5, num_running=1), stats(generation_tokens=9),
                  stats(generation_tokens=9)])
    log = StatLogger(lambda: next(snaps), interval=1.0)
    assert log.tick(0.0) is None  # the first snapshot
    assert log.tick(1.0) is None  # idle
    assert "Running: 1 reqs" in (log.tick(2.0) or "")
    assert "Avg generation throughput: 4.0 tokens/s" in (log.tick(3.0) or "")  # the burst's last tokens
    assert log.tick(4.0) is None  # idle again: quiet


def test_request_token_buckets_are_vllms() -> None:
    assert buckets_1_2_5(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


@pytest.fixture(scope="module")
def op_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with ServerProcess(tiny_model, "--log-level", "info", "--log-stats-interval", "0.2", "--api-key", KEY,
                       "--enable-docs", "--depth-metrics", log_dir=tmp_path_factory.mktemp("op-logs")) as srv:
        yield srv


def test_startup_lines_say_what_vllm_says(op_server: ServerProcess) -> None:
    log = op_server.log()
    for words in ("dtype float32 (auto: the checkpoint's dtype (float32))", "max_model_len 256",
                  "KV cache size: ", "maximum concurrency for 256 tokens per request: ", "depth pool: ",
                  "threads 1", "tensor_parallel_size 1", "API key auth: on"):
        assert words in log, words


def test_probe_endpoints(op_server: ServerProcess) -> None:
    url = op_server.url
    r = httpx.get(url + "/version")
    assert r.status_code == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", r.json()["version"])
    assert httpx.get(url + "/ping").status_code == 200
    assert httpx.post(url + "/ping").status_code == 200
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    denied = httpx.get(url + "/v1/models")
    assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")


def test_vllm_metrics_and_stats_line_after_a_request(op_server: ServerProcess) -> None:
    name = httpx.get(op_server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    r = httpx.post(op_server.url + "/v1/completions", headers=AUTH,
                   json={"model": name, "prompt": "Friends, Romans", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    text = httpx.get(op_server.url + "/metrics").text
    assert "_created" not in text
    samples = scrape(op_server.url)
    for name in NEW_METRICS:
        assert any(k.partition("{")[0].startswith("depthserve:" + name) for k in samples), name
    assert samples[next(k for k in samples if k.startswith("depthserve:request_generation_tokens_sum"))] >= 5
    assert any('num_gpu_blocks="' in k for k in samples if k.startswith("depthserve:cache_config_info"))
    deadline = time.monotonic() + 10
    while "Avg generation throughput" not in op_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = op_server.log()
    assert "Avg generation throughput" in log and "Prefix cache hit rate" in log
    assert "uvicorn.access" in log  # the access log, in the same format
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert all(LOG_LINE.match(ln) for ln in lines), [ln for ln in lines if not LOG_LINE.match(ln)][:3]


def test_every_metric_the_dashboard_queries_exists(op_server: ServerProcess) -> None:
    dashboard = json.loads((REPO / "grafana" / "depthserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {name for e in exprs for name in re.findall(r"depthserve:[A-Za-z0-9_:]+", e)}
    assert len(queried) > 20
    name = httpx.get(op_server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    r = httpx.post(op_server.url + "/v1/completions", headers=AUTH,  # so the depth weights have values
                   json={"model": name, "prompt": "To be", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200
    exposed = {k.partition("{")[0] for k in scrape(op_server.url)}
    assert sorted(queried - exposed) == []
    panels = " ".join(p["title"] for p in dashboard["panels"])
    assert "Depth pool use" in panels and "Depth-attention weights" in panels


def test_quiet_switches(tiny_model: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_model, "--log-level", "info", "--log-stats-interval", "0.1", "--disable-log-stats",
                       "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning", log_dir=tmp_path) as srv:
        name = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": name, "prompt": "To be", "max_tokens": 3})
        assert r.status_code == 200
        time.sleep(0.4)
        log = srv.log()
    assert "KV cache size" in log  # the engine still logs at info
    assert "Avg prompt throughput" not in log and "uvicorn.access" not in log
    assert "Started server process" not in log
