"""A `--tensor-parallel-size 2` server answers like TP=1; a killed worker turns /health to 503 with no orphans."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess


def _children(pid: int) -> list[int]:
    """Direct child pids from /proc (the TP workers are the server's children)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_tp2_server_answers_then_fails_fast_on_worker_death(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": [1, 5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with ServerProcess(tiny_model, log_dir=tmp_path) as tp1:
        want = httpx.post(tp1.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    with ServerProcess(tiny_model, "--tensor-parallel-size", "2", log_dir=tmp_path, startup_timeout=90) as srv:
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        workers = [p for p in _children(srv.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert workers, "no tensor-parallel worker process found"
        for p in workers:
            os.kill(p, signal.SIGKILL)
        t0 = time.monotonic()
        status = 200
        while time.monotonic() - t0 < 10 and status == 200:
            status = httpx.get(srv.url + "/health", timeout=5).status_code
            time.sleep(0.1)
        assert status == 503, srv.log()
        assert time.monotonic() - t0 < 5
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and "worker" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    assert not _children(srv.proc.pid)
