"""Metrics, client disconnects freeing KV, 429 under a burst, SIGTERM, and CLI user errors."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

import httpx
import pytest

from server.cli import main
from tests.server.conftest import (
    API_KEY,
    MODEL_NAME,
    ServerProcess,
    metric,
    scrape,
    sse_events,
    wait_for_metric,
)

P = "depthserve:"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": 240, "ignore_eos": True}

METRIC_NAMES = [
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_blocks_held",
    "depth_cache_usage_perc", "depth_cache_bytes", "prompt_tokens_total", "generation_tokens_total",
    "request_success_total", "num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total",
    "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
    "request_queue_time_seconds_count",
]


def idle(url: str) -> None:
    """Wait until no request holds KV blocks or runs (other tests may have left work in flight)."""
    assert wait_for_metric(url, P + "num_requests_running", lambda v: v == 0) == 0
    assert wait_for_metric(url, P + "kv_cache_blocks_held", lambda v: v == 0) == 0


def test_metrics_names_and_counters_move(server: ServerProcess) -> None:
    idle(server.url)
    before = scrape(server.url)
    for name in METRIC_NAMES:
        assert any(k.partition("{")[0] == P + name for k in before), name
    assert metric(before, P + "depth_cache_bytes") > 0
    r = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                   json={"model": MODEL_NAME, "prompt": "Friends, Romans", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    after = scrape(server.url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, P + name, **labels) - metric(before, P + name, **labels)

    assert delta("generation_tokens_total") == 4
    assert delta("prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert delta("prefix_cache_queries_total") > 0
    assert delta("request_success_total", finished_reason="length") == 1
    assert delta("time_to_first_token_seconds_count") == 1
    assert delta("inter_token_latency_seconds_count") == 3
    assert delta("e2e_request_latency_seconds_count") == 1
    assert delta("request_queue_time_seconds_count") == 1


def test_streaming_disconnect_aborts_and_frees_kv(server: ServerProcess) -> None:
    idle(server.url)
    aborted = metric(scrape(server.url), P + "request_success_total", finished_reason="abort")
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=30) as c, \
            c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        assert next(sse_events(r.iter_lines()))
    # the connection is closed mid-stream: the request is aborted and its blocks freed
    assert wait_for_metric(server.url, P + "request_success_total", lambda v: v > aborted,
                           finished_reason="abort") == aborted + 1
    idle(server.url)


def test_non_streaming_disconnect_aborts(server: ServerProcess) -> None:
    idle(server.url)
    aborted = metric(scrape(server.url), P + "request_success_total", finished_reason="abort")
    body = json.dumps(LONG).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        assert wait_for_metric(server.url, P + "kv_cache_blocks_held", lambda v: v > 0) > 0
    assert wait_for_metric(server.url, P + "request_success_total", lambda v: v > aborted,
                           finished_reason="abort") == aborted + 1
    idle(server.url)


def test_burst_beyond_queue_gets_429(server: ServerProcess) -> None:
    idle(server.url)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=60) as c:
            body = {**LONG, "max_tokens": 48}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    idle(server.url)


def test_sigterm_drains_and_exits_zero(tiny_model: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_model, log_dir=tmp_path) as srv:  # no API key: everything is open
        with httpx.Client(base_url=srv.url, timeout=30) as c, \
                c.stream("POST", "/v1/completions", json={"prompt": "To be", "max_tokens": 60, "stream": True,
                                                          "ignore_eos": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
            assert next(events)
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]"  # the in-flight stream finished before the server went away
        assert srv.proc.wait(20) == 0
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "/nonexistent/model"], "neither a folder nor a built-in model"),
    (["--kv-cache-memory", "1KiB"], "raise --kv-cache-memory"),
    (["--kv-cache-memory", "lots"], "cannot read 'lots' as a size"),
    (["--tensor-parallel-size", "3"], "tensor_parallel_size=3"),
    (["--max-model-len", "100000"], "max_position_embeddings"),
    (["--request-timeout", "0"], "--request-timeout must be > 0"),
])
def test_cli_user_errors_exit_2_in_one_line(tiny_model: Path, capsys: pytest.CaptureFixture[str],
                                            args: list[str], message: str) -> None:
    full = ["serve", "--model", str(tiny_model), "--port", "0", "--log-level", "error", *args]
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("depthserve: error:") and message in err and "\n" not in err, err


def test_cli_port_in_use(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--model", str(tiny_model), "--port", str(port), "--log-level", "error"]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_cli_help_and_subcommands(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--port", "--max-queued-requests", "--api-key", "--tensor-parallel-size"):
        assert flag in help_text
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--no-such-flag"])
    assert e.value.code == 2

    import models.train

    seen: list[list[str]] = []
    monkeypatch.setattr(models.train, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["train", "--help", "--tokens", "5"]) == 0 and seen == [["--help", "--tokens", "5"]]
