"""A server subprocess for the benchmarks: started, waited for until it answers, stopped however the block ends.

    with server([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], port, log) as url:
        ...  # requests against url

It runs in its own session (process group), with this checkout first on PYTHONPATH (so `python -m server.cli`
runs the tree the benchmark came from), and is killed with its whole group: TERM, then KILL. `kill_all` stops
every server still running (for a SIGTERM handler).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

_LIVE: list[subprocess.Popen] = []


def _kill(proc: subprocess.Popen) -> None:
    """Stop a server we started: its whole process group (it was started in a new session), TERM then KILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_all(*_: Any) -> None:
    for proc in list(_LIVE):
        _kill(proc)


def on_sigterm(signum: int, frame: Any) -> None:
    kill_all()
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path, timeout: float = 180.0) -> Iterator[str]:
    """A started server's base URL, once /v1/models answers; killed when the block ends, however it ends."""
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                    p for p in (str(Path(__file__).resolve().parents[1]),
                                                os.environ.get("PYTHONPATH")) if p)))
    _LIVE.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}) before it was ready; see {log}:\n"
                                   + "".join(log.read_text().splitlines(True)[-15:]))
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f}s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        _kill(proc)
        _LIVE.remove(proc)
