"""Test-only launcher: `python -m tests.server.fault_server serve ...` is `depthserve serve` with fault injection.

Production code carries no hook and pays nothing: this module patches the engine's classes in the server
process before handing over to `server.cli.main`. A request opts in by the first three ids of its prompt:

    STEP_FAULT  the model forward of any step that holds this request raises (inside ModelRunner.execute,
                so its cleanup runs as for a real fault): the engine must fail that step's requests only
    FATAL       the scheduler raises WorkerDiedError while this request waits (as when a tensor-parallel
                worker dies): the engine loop itself stops
    STUCK       the scheduler raises an ordinary error while this request waits: the requests in flight
                fail, the loop goes on serving
    SLOW        every forward of a step that holds this request sleeps SLOW_SECONDS (request timeouts)

The injected message names a file path, so tests can check that no error body leaks one.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

STEP_FAULT = [7, 7, 7]
FATAL = [8, 8, 8]
SLOW = [9, 9, 9]
STUCK = [6, 6, 6]
SLOW_SECONDS = 0.25
FAKE_PATH = "/srv/secret/weights/model.safetensors"


def _marked(req: Any, marker: list[int]) -> bool:
    return list(req.prompt_token_ids[: len(marker)]) == marker


def install() -> None:
    """Patch ModelRunner.execute, LlamaForServing.forward and Scheduler.schedule (this process only)."""
    from engine.model_runner import ModelRunner
    from engine.parallel import WorkerDiedError
    from engine.scheduler import Scheduler
    from models.llama import LlamaForServing

    state = threading.local()  # the engine thread's view of the step being executed
    execute, forward, schedule = ModelRunner.execute, LlamaForServing.forward, Scheduler.schedule

    def faulty_execute(self: ModelRunner, step: Any) -> Any:
        reqs = [s.request for s in step.scheduled]
        state.fail = any(_marked(r, STEP_FAULT) for r in reqs)
        state.slow = any(_marked(r, SLOW) for r in reqs)
        return execute(self, step)

    def faulty_forward(self: LlamaForServing, batch: Any, *args: Any) -> Any:
        if getattr(state, "slow", False):
            time.sleep(SLOW_SECONDS)
        if getattr(state, "fail", False):
            raise RuntimeError(f"injected step fault while reading {FAKE_PATH}")
        return forward(self, batch, *args)

    def faulty_schedule(self: Scheduler) -> Any:
        if any(_marked(r, FATAL) for r in self.waiting):
            raise WorkerDiedError(f"injected fatal fault in {FAKE_PATH}")
        if any(_marked(r, STUCK) for r in self.waiting):
            raise RuntimeError(f"injected scheduler fault in {FAKE_PATH}")
        return schedule(self)

    ModelRunner.execute = faulty_execute  # type: ignore[method-assign]
    LlamaForServing.forward = faulty_forward  # type: ignore[method-assign]
    Scheduler.schedule = faulty_schedule  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from server.cli import main

    sys.exit(main())
