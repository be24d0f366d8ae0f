"""What a browser page, a slow or greedy client, or a shutdown can do to a server on 127.0.0.1.

Content types (no-cors POSTs), Host checks (DNS rebinding), no Host-echoing redirects, the request-header
deadline and the connection cap (real uvicorn processes), the tensor-parallel rendezvous listening on
loopback only, and requests still running past --shutdown-timeout ending with an OpenAI-shaped error.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess, sse_events
from tests.server.fault_server import SLOW

KEY = {"Authorization": f"Bearer {API_KEY}"}
POSTS = {"/v1/completions": {"prompt": "hi", "max_tokens": 1},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
         "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5]}}
HEADER_TIMEOUT_S = 1.5


def error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    return body["error"]


# ---- A. browser-reachable requests ------------------------------------------------------------------
@pytest.mark.parametrize("path", list(POSTS))
def test_post_without_content_type_is_415(server: ServerProcess, path: str) -> None:
    """fetch(url, {mode: "no-cors", method: "POST", body}) sends no JSON type and needs no preflight."""
    body = httpx.Request("POST", "http://x", json=POSTS[path]).read()
    r = httpx.post(server.url + path, content=body, headers=KEY, timeout=30)
    assert "content-type" not in r.request.headers
    assert "Content-Type" in error(r, 415, "unsupported_media_type")["message"]
    ok = httpx.post(server.url + path, content=body, headers={**KEY, "Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200, ok.text


FOREIGN = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/no/such/path"),
           ("POST", "/v1/completions")]


def test_foreign_host_is_refused_on_every_path(server: ServerProcess) -> None:
    """DNS rebinding: a loopback-bound server answers loopback host names only."""
    for method, path in FOREIGN:
        r = httpx.request(method, server.url + path, headers={**KEY, "Host": "evil.com"},
                          json=POSTS.get(path), timeout=30)
        err = error(r, 400, "host_not_allowed")
        assert "--allowed-hosts evil.com" in err["message"], err
    port = server.port
    for host in (f"localhost:{port}", "localhost", "LocalHost.", f"127.0.0.1:{port}", "127.3.2.1", f"[::1]:{port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("127.0.0.1.evil.com", "localhost.evil.com", "[::2]", "0.0.0.0", "evil.com:8000"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 400, host


def no_redirect(srv: ServerProcess, host: str) -> None:
    """A trailing-slash redirect would send a client to whatever host its request named."""
    r = httpx.get(srv.url + "/v1/models/", headers={**KEY, "Host": host})
    assert not r.is_redirect and host not in r.headers.get("location", ""), (r.status_code, r.headers)
    assert r.status_code in (400, 404)


def test_no_redirect_echoes_the_host(server: ServerProcess) -> None:
    no_redirect(server, "evil.com")


@pytest.fixture(scope="module")
def guarded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--allowed-hosts, a short header deadline and a cap of 2 connections."""
    with ServerProcess(tiny_model, "--api-key", API_KEY, "--allowed-hosts", "app.test", "*.example.org",
                       "10.1.0.0/16", "--header-timeout", str(HEADER_TIMEOUT_S), "--max-connections", "2",
                       log_dir=tmp_path_factory.mktemp("guarded-logs")) as srv:
        yield srv


def test_allowed_hosts_add_to_loopback(guarded: ServerProcess) -> None:
    for host in ("app.test", "APP.TEST:80", "a.b.example.org", "10.1.2.3", "localhost", "127.0.0.1"):
        assert httpx.get(guarded.url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("example.org", "x.app.test", "10.2.0.1", "evil.com"):
        error(httpx.get(guarded.url + "/health", headers={"Host": host}), 400, "host_not_allowed")
    no_redirect(guarded, "app.test")


def _connect(srv: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return s


def _closed_within(s: socket.socket, seconds: float, dribble: bytes = b"") -> float:
    """Seconds until the server closes `s` (sending `dribble` a byte at a time meanwhile); inf if never."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    i = 0
    while time.monotonic() - t0 < seconds:
        try:
            if i < len(dribble):
                s.sendall(dribble[i:i + 1])
                i += 1
            if s.recv(1024) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            return time.monotonic() - t0
    return float("inf")


def test_connection_cap_then_header_deadline(guarded: ServerProcess) -> None:
    """Two idle sockets fill --max-connections 2: a third client gets a JSON 503. Neither idle socket,
    nor one dribbling its headers, outlives --header-timeout; then the server answers again."""
    idle, dribbler = _connect(guarded), _connect(guarded)
    try:
        time.sleep(0.2)
        r = httpx.get(guarded.url + "/health")
        err = error(r, 503, "too_many_connections")
        assert err["type"] == "service_unavailable_error" and "retry-after" in r.headers
        header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100
        assert _closed_within(dribbler, HEADER_TIMEOUT_S + 5, dribble=header) < HEADER_TIMEOUT_S + 2
        assert _closed_within(idle, 5) < 5
    finally:
        idle.close()
        dribbler.close()
    time.sleep(0.2)
    assert httpx.get(guarded.url + "/health").status_code == 200
    with httpx.Client(base_url=guarded.url, headers=KEY) as c:  # keep-alive requests are not cut short
        for _ in range(2):
            assert c.get("/v1/models").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)
    assert "Traceback" not in guarded.log()


# ---- tensor-parallel rendezvous ---------------------------------------------------------------------
def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets `pid` listens on, from /proc (no psutil needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    addr, port = cols[1].split(":")
                    assert len(addr) == width
                    out.append((_proc_addr(addr), int(port, 16)))
    return out


def _proc_addr(hex_addr: str) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
    return str(ipaddress.ip_address(words))


def _rank1(port: int, done: float) -> None:
    import torch.distributed as dist

    from engine.parallel import _init

    _init(1, 2, port)
    dist.barrier()
    time.sleep(done)
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp_rendezvous_listens_on_loopback_only() -> None:
    import ipaddress

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from engine.parallel import _init, loopback_listener

    listener = loopback_listener()
    port = listener.getsockname()[1]
    worker = mp.get_context("spawn").Process(target=_rank1, args=(port, 2.0), daemon=True)
    worker.start()
    try:
        _init(0, 2, port, listener)
        dist.barrier()
        found = _listening(os.getpid()) + _listening(worker.pid)  # type: ignore[arg-type]
        assert any(p == port for _, p in found), found  # the store, gloo's pairs are also listed
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in found), found
    finally:
        listener.close()
        worker.join(30)
        if dist.is_initialized():
            dist.destroy_process_group()
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0


# ---- B. shutdown past the drain timeout -------------------------------------------------------------
LONG = {"model": MODEL_NAME, "prompt": SLOW + [20], "max_tokens": 200, "ignore_eos": True}


def test_requests_past_shutdown_timeout_end_with_503(tiny_model: Path, tmp_path: Path) -> None:
    """SIGTERM with --shutdown-timeout 2 while two slow generations run: the plain one gets a JSON 503,
    the stream an error event then [DONE]; the server exits 0 and logs no traceback."""
    srv = ServerProcess(tiny_model, "--served-model-name", MODEL_NAME, "--shutdown-timeout", "2",
                        log_dir=tmp_path, module="tests.server.fault_server")
    plain: list[httpx.Response] = []
    events: list[dict | str] = []
    streaming = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            for event in sse_events(r.iter_lines()):
                events.append(event)
                streaming.set()

    try:
        srv.wait_healthy()
        threads = [threading.Thread(target=lambda: plain.append(httpx.post(srv.url + "/v1/completions",
                                                                           json=LONG, timeout=60))),
                   threading.Thread(target=stream)]
        for t in threads:
            t.start()
        assert streaming.wait(30)
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert time.monotonic() - t0 < 2 + 3 + 1
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    log = srv.log()
    assert len(plain) == 1, log
    err = error(plain[0], 503, "engine_unavailable")
    assert "shutting down" in err["message"], err
    assert events[-1] == "[DONE]", events[-3:]
    last = events[-2]["error"]  # type: ignore[index]
    assert last["code"] == "engine_unavailable" and "shutting down" in last["message"], events[-3:]
    assert "Traceback" not in log and "Internal Server Error" not in log, log
