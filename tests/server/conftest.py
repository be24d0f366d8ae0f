"""Fixtures for server tests: a tiny random checkpoint and real `depthserve serve` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from loadtest.ports import free_port

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MODEL_NAME = "tiny"


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny import tiny_config, write_tiny

    folder = tmp_path_factory.mktemp("tiny-server-model")
    write_tiny(folder, tiny_config("block", block_size=2), tokenizer_from=tokenizer_dir)
    return folder


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process engines use one torch thread (much faster on 2 busy cores); restore afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class ServerProcess:
    """A `python -m server.cli serve` subprocess; logs go to a file (a full pipe would block it).

    `module`: another launcher with server.cli's command line (tests.server.fault_server injects faults).
    As a context manager: waits until healthy (up to `startup_timeout` s), and stops it on the way out
    (`proc.returncode` is then its exit status).
    """

    def __init__(self, model: Path, *args: str, log_dir: Path, module: str = "server.cli",
                 startup_timeout: float = 60.0) -> None:
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", module, "serve", "--model", str(model), "--port", str(self.port),
               "--num-threads", "1", "--log-level", "warning", "--kv-cache-memory", "8MiB",
               "--depth-cache-memory", "8MiB", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "DEPTHSERVE_API_KEY": ""}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy after {timeout} s:\n{self.log()}")

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_healthy(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="package")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server: API key, small body limit, a small queue bound for the 429 test."""
    with ServerProcess(tiny_model, "--api-key", API_KEY, "--served-model-name", MODEL_NAME,
                       "--max-num-seqs", "4", "--max-queued-requests", "2", "--max-body-size", "64KiB",
                       log_dir=tmp_path_factory.mktemp("server-logs")) as srv:
        yield srv


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """An SSE response's events as they arrive (pass `response.iter_lines()`): each `data:` JSON decoded,
    the final '[DONE]' as that string."""
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, comments dropped."""
    text = httpx.get(url + "/metrics", timeout=5.0).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_for_metric(url: str, name: str, predicate, timeout: float = 10.0, **labels: str) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = metric(scrape(url), name, **labels)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
