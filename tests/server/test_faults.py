"""Faults end to end (real server processes with injected faults, see fault_server.py) and request timeouts.

A failed model step fails the requests of that step only: they get an OpenAI-style 500 (or a stream error
event), their KV blocks and depth rows are freed, and the server keeps serving. A dead engine loop makes
/health and every new request 503 at once. No error body carries a traceback or a file path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, ServerProcess, metric, scrape, sse_events, wait_for_metric
from tests.server.fault_server import FAKE_PATH, FATAL, SLOW, STEP_FAULT, STUCK

P = "depthserve:"
TIMEOUT_S = 2.0
NORMAL = {"model": MODEL_NAME, "prompt": [20, 21, 22], "max_tokens": 4, "ignore_eos": True}


def fault_server(tiny_model: Path, log_dir: Path, *args: str) -> ServerProcess:
    return ServerProcess(tiny_model, "--served-model-name", MODEL_NAME, "--max-num-seqs", "8", *args,
                         log_dir=log_dir, module="tests.server.fault_server")


@pytest.fixture(scope="module")
def faulty(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with fault_server(tiny_model, tmp_path_factory.mktemp("fault-logs"), "--request-timeout", str(TIMEOUT_S)) as srv:
        yield srv


def clean_error(r: httpx.Response | dict, status: int | None = None) -> dict:
    """An OpenAI error body with no traceback and no server path in it."""
    if isinstance(r, httpx.Response):
        assert r.status_code == status, r.text
        assert "traceback" not in r.text.lower() and FAKE_PATH not in r.text and "/srv/" not in r.text, r.text
        body = r.json()
    else:
        body = r
        assert FAKE_PATH not in json.dumps(body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def sse(c: httpx.Client, body: dict) -> list[dict | str]:
    """A streamed completion's events: decoded JSON, or the final '[DONE]'."""
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return list(sse_events(r.iter_lines()))


def assert_idle(url: str) -> None:
    """Nothing running or waiting, no KV block held by a request, no depth row left reserved."""
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_held", "depth_cache_rows_in_use"):
        assert wait_for_metric(url, P + name, lambda v: v == 0) == 0, name


def test_step_fault_fails_that_step_only(faulty: ServerProcess) -> None:
    with httpx.Client(base_url=faulty.url, timeout=30) as c:
        assert c.post("/v1/completions", json=NORMAL).status_code == 200
        errors = metric(scrape(faulty.url), P + "request_success_total", finished_reason="error")

        # a long stream is running when the faulty request joins its step: both fail, cleanly
        neighbour: list[dict | str] = []
        t = threading.Thread(target=lambda: neighbour.extend(
            sse(c, {**NORMAL, "max_tokens": 200})))
        t.start()
        assert wait_for_metric(faulty.url, P + "num_requests_running", lambda v: v >= 1) >= 1
        err = clean_error(c.post("/v1/completions", json={**NORMAL, "prompt": STEP_FAULT + [20]}), 500)
        assert err["type"] == "internal_error" and err["code"] == "engine_error"
        assert "model step failed" in err["message"]
        t.join(30)
        assert neighbour[-1] == "[DONE]" and isinstance(neighbour[-2], dict)
        assert clean_error(neighbour[-2])["code"] == "engine_error"  # type: ignore[arg-type]

        events = sse(c, {**NORMAL, "prompt": STEP_FAULT + [21]})  # streaming: an error event, then [DONE]
        assert events[-1] == "[DONE]" and clean_error(events[-2])["code"] == "engine_error"  # type: ignore[arg-type]

        assert_idle(faulty.url)
        after = scrape(faulty.url)
        assert metric(after, P + "request_success_total", finished_reason="error") == errors + 3
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json=NORMAL)  # the engine goes on serving
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_an_error_outside_any_request_fails_the_requests_in_flight_not_the_loop(faulty: ServerProcess) -> None:
    """The scheduler raising (no request's row to blame) used to kill the engine loop for good."""
    with httpx.Client(base_url=faulty.url, timeout=30) as c:
        err = clean_error(c.post("/v1/completions", json={**NORMAL, "prompt": STUCK + [20]}), 500)
        assert err["code"] == "engine_error"
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json=NORMAL)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert_idle(faulty.url)
    assert "injected scheduler fault" in faulty.log()


def test_request_timeout_aborts_and_frees(faulty: ServerProcess) -> None:
    slow = {**NORMAL, "prompt": SLOW + [20], "max_tokens": 100}  # 0.25 s per step: far beyond the timeout
    with httpx.Client(base_url=faulty.url, timeout=30) as c:
        aborted = metric(scrape(faulty.url), P + "request_success_total", finished_reason="abort")
        t0 = time.monotonic()
        err = clean_error(c.post("/v1/completions", json=slow), 504)
        assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 3
        assert err["type"] == "timeout_error" and err["code"] == "request_timeout"
        events = sse(c, slow)
        assert events[-1] == "[DONE]" and clean_error(events[-2])["code"] == "request_timeout"  # type: ignore[arg-type]
        assert wait_for_metric(faulty.url, P + "request_success_total", lambda v: v >= aborted + 2,
                               finished_reason="abort") == aborted + 2
        assert_idle(faulty.url)
        assert c.post("/v1/completions", json=NORMAL).status_code == 200


def test_dead_engine_loop_is_503_at_once(tiny_model: Path, tmp_path: Path) -> None:
    with fault_server(tiny_model, tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        in_flight: list[dict | str] = []
        t = threading.Thread(target=lambda: in_flight.extend(sse(c, {**NORMAL, "max_tokens": 200})))
        t.start()
        assert wait_for_metric(srv.url, P + "num_requests_running", lambda v: v >= 1) >= 1
        err = clean_error(c.post("/v1/completions", json={**NORMAL, "prompt": FATAL + [20]}), 503)
        assert err["code"] == "engine_unavailable" and "restart the server" in err["message"], err
        assert "injected" not in err["message"] and "RuntimeError" not in err["message"], err
        t.join(30)
        assert in_flight[-1] == "[DONE]"
        assert clean_error(in_flight[-2])["code"] == "engine_unavailable"  # type: ignore[arg-type]

        for _ in range(3):  # every later request fails fast, without queueing
            t0 = time.monotonic()
            assert "restart the server" in clean_error(c.get("/health"), 503)["message"]
            clean_error(c.post("/v1/completions", json=NORMAL), 503)
            clean_error(c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True}), 503)
            assert time.monotonic() - t0 < 2.0
    assert "injected fatal fault" in srv.log()  # the details go to the log, not to clients
