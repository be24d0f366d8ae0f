"""depthserve::release_openmp_pool (kernels/csrc/threads.cpp): the calling thread's OpenMP workers exit, and a
later parallel region builds its pool again (AsyncLLMEngine.start relies on both)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kernels import cpu_ext


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status here")


def test_release_openmp_pool_frees_the_workers_of_this_thread() -> None:
    if cpu_ext.load() is None or not hasattr(torch.ops.depthserve, "release_openmp_pool"):
        pytest.skip("the native library (kernels/csrc) cannot be built or loaded here")
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: no pool workers to free")
    out: list[int] = []

    def run() -> None:  # a thread of its own, so that pytest's main-thread pool does not count
        x = torch.randn(512, 512)
        want = (x @ x).sum()  # a parallel region: this thread's pool gets its workers
        with_pool = _threads()
        assert cpu_ext.release_openmp_pool()
        out.extend([with_pool, _threads()])
        assert torch.allclose((x @ x).sum(), want)  # works again, on a new pool
        out.append(_threads())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    with_pool, released, again = out
    assert released < with_pool and again == with_pool
