"""AsyncLLMEngine: the engine loop on a background thread, per-request streams on the asyncio side.

LLMEngine is not thread-safe, so exactly one thread (the engine thread) touches it: the asyncio side
only validates/tokenizes (`make_request`, which reads no engine state) and posts commands (add, abort)
to a locked list that the engine thread drains at the start of each step. Outputs go back once per
step through `loop.call_soon_threadsafe`, together with an `engine.stats()` snapshot, so metrics never
read the engine across threads. When idle the thread sleeps on a condition (no busy spin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from engine.outputs import CompletionOutput, RequestOutput
from engine.parallel import WorkerDiedError
from engine.request import Request
from engine.sampling_params import SamplingParams
from kernels import cpu_ext

if TYPE_CHECKING:
    from engine.llm_engine import EngineStats, LLMEngine, PromptType

logger = logging.getLogger("depthserve.async_engine")


# Under the server, pure-decode steps of up to this many rows run on one thread (LLMEngine._step_threads): the
# event loop and the response streams keep a core. 1 stream on 2 cores: 5.2 ms a token on one thread, 8.7 on two;
# 8 streams: two threads ahead (411 vs 353 tok/s).
SERVER_SMALL_STEP_ROWS = 2


class QueueFullError(RuntimeError):
    """Too many requests are waiting for the engine: the client should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop has died or shut down: no request can be served (HTTP 503).

    Its message goes to clients as is, so it says what happened in the user's terms; the exception
    behind it (class, message, traceback) is only logged.
    """


ENGINE_FAILED = "the engine has stopped after an internal error; restart the server"
WORKER_FAILED = "the engine has stopped after a tensor-parallel worker failed; restart the server"
SHUTTING_DOWN = "the server is shutting down"


class RequestTimeoutError(RuntimeError):
    """A request group passed its deadline; its unfinished requests have been aborted (HTTP 504)."""


class RequestObserver(Protocol):
    """Hooks for request-level metrics, called on the event loop where outputs are delivered."""

    def observe_queue_time(self, seconds: float) -> None: ...
    def observe_first_token(self, seconds: float) -> None: ...
    def observe_inter_token(self, seconds: float) -> None: ...
    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None: ...
    def observe_request(self, stats: FinishedRequestStats) -> None: ...
    def observe_iteration_tokens(self, tokens: int) -> None: ...


@dataclass(frozen=True)
class FinishedRequestStats:
    """Per-request sizes and phase times of a finished request (vLLM's request-level histograms).

    prefill: first scheduled -> first token; decode: first token -> last token; inference: both.
    """

    prompt_tokens: int
    generation_tokens: int  # over all n samples
    max_sample_tokens: int  # the longest sample's
    prefill_seconds: float | None
    decode_seconds: float | None
    inference_seconds: float | None


@dataclass
class _Track:
    """Asyncio-side state of one engine request."""

    group: RequestGroup
    scheduled_seen: bool = False
    generated: dict[int, int] = field(default_factory=dict)  # sample index -> tokens delivered so far
    detached: bool = False  # aborted by the client: still observed for metrics, no longer queued


class RequestGroup:
    """Outputs of one or more engine requests (a batch of prompts) for one consumer.

    Iterate with `async for`; it ends when every member has finished. Engine death or shutdown is
    raised from the iterator as EngineDeadError. `abort()` (idempotent) aborts unfinished members:
    call it in a `finally` so that a client disconnect frees the KV cache. With a `deadline`
    (time.monotonic()), the iterator aborts the group and raises RequestTimeoutError once it passes,
    so a stuck or over-long request cannot hold its KV blocks and its queue slot forever.

    Memory stays bounded when the consumer is slow (a client that stops reading): each request keeps
    at most one undelivered output, into which later DELTA outputs are merged (vLLM's collector).
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: Sequence[str], deadline: float | None = None) -> None:
        self._engine = engine
        self.request_ids = list(request_ids)
        self.deadline = deadline
        self._pending: dict[str, RequestOutput] = {}  # per request: delivered, not yet taken
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._unfinished = set(self.request_ids)

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending:
                out = self._pending.pop(next(iter(self._pending)))
                if out.finished:
                    self._unfinished.discard(out.request_id)
                return out
            if self._error is not None:
                self._unfinished.clear()
                raise self._error
            if not self._unfinished:
                raise StopAsyncIteration
            self._ready.clear()
            if self.deadline is None:
                await self._ready.wait()
            else:
                await self._wait_before_deadline(self.deadline)

    async def _wait_before_deadline(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), remaining)
                return
        self.abort()
        raise RequestTimeoutError("the request did not finish in time and was aborted")

    def abort(self) -> None:
        for rid in list(self._unfinished):
            self._engine.abort(rid)
        self._unfinished.clear()

    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        elif (held := self._pending.get(item.request_id)) is not None:
            held.merge(item)
        else:
            self._pending[item.request_id] = item
        self._ready.set()

    @property
    def num_pending(self) -> int:
        """Undelivered outputs (at most one per request, whatever the consumer's speed)."""
        return len(self._pending)


class AsyncLLMEngine:
    """Drives an LLMEngine from a background thread for an asyncio server.

    `max_queued_requests` bounds the requests accepted but not yet admitted by the scheduler: when that
    many are waiting, `submit` raises QueueFullError (a batch is accepted whole while the queue is not
    full, so a large `n` cannot starve). 0 disables the bound.
    """

    def __init__(self, engine: LLMEngine, max_queued_requests: int = 0,
                 observer: RequestObserver | None = None) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.engine = engine
        if engine.config.small_step_rows is None:
            engine.small_step_rows = SERVER_SMALL_STEP_ROWS
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.stats: EngineStats | None = None  # latest snapshot, updated on the event loop
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Request | str]] = []  # guarded by _cond
        self._num_waiting = 0  # requests in the scheduler's waiting queue, as of the last step; _cond
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracks: dict[str, _Track] = {}  # event-loop side only

    # ---- read-only facts (immutable after the engine is built) -------------------------------------
    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]  # models.tokenizer.Tokenizer | None
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs are delivered on `loop` (default: the running loop)."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine already started")
        self._loop = loop or asyncio.get_running_loop()
        self.stats = self.engine.stats()  # before the thread exists, so still single-threaded
        if self.engine.runner.device.type == "cpu":
            # the engine thread's OpenMP team must be the only one: with this thread's (from loading) alive too,
            # libgomp stops spin-waiting and each parallel region of a step woke its worker through a futex
            # (SmolLM2 Q8_0, 32 streams, 2 cores: 887 -> 1068 tokens/s; kernels/csrc/threads.cpp)
            cpu_ext.release_openmp_pool()
        self.engine.scheduler.record_latencies = self.observer is not None
        self._thread = threading.Thread(target=self._run, name="depthserve-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def is_healthy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._dead is None
                and not self._stopping and self._fatal() is None)

    @property
    def unavailable_reason(self) -> str:
        """Why requests cannot be served now, for clients (the details are in the server log)."""
        if self._dead is not None or self._fatal() is not None:
            return self._failure()
        if self._stopping:
            return SHUTTING_DOWN
        return "the engine is not running" if self._thread is None or not self._thread.is_alive() else ""

    @property
    def dead_error(self) -> BaseException | None:
        if self._dead is None and (fatal := self._fatal()) is not None:
            return EngineDeadError(fatal)
        return self._dead

    def _failure(self) -> str:
        """What clients are told once the engine has failed."""
        return WORKER_FAILED if self._fatal() is not None else ENGINE_FAILED

    def _fatal(self) -> str | None:
        """A fatal engine condition noticed off-step (a tensor-parallel worker died while idle).

        Reads plain attributes set by the engine and its watchdog: a benign cross-thread read.
        """
        eng = self.engine
        fatal = getattr(eng, "fatal_error", None)
        tp = getattr(eng, "tp_group", None)
        return fatal or (getattr(tp, "dead", None) if tp is not None else None)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step, abort every request, fail open streams.

        Safe from any thread; idempotent. Called from a worker thread by the server's lifespan so the
        event loop keeps delivering while the engine finishes its step.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.0f s", timeout)
        err = EngineDeadError(SHUTTING_DOWN)
        if self._loop is not None and self._on_loop():
            self._fail_all(err)
        else:
            self._post(self._fail_all, err)

    # ---- requests (event loop side) ----------------------------------------------------------------
    def make_request(self, prompt: PromptType, params: SamplingParams, request_id: str) -> Request:
        """Validate and tokenize (raises ValueError/TypeError); touches no engine state."""
        return self.engine.make_request(prompt, params, request_id)

    def submit(self, requests: Sequence[Request], deadline: float | None = None) -> RequestGroup:
        """Queue validated requests as one group. Raises EngineDeadError or QueueFullError.

        `deadline` (time.monotonic()): past it, iterating the group aborts it with RequestTimeoutError.
        """
        self._check_alive()
        with self._cond:
            pending = sum(1 for kind, _ in self._commands if kind == "add")
            queued = pending + self._num_waiting
            if self.max_queued_requests and queued >= self.max_queued_requests:
                raise QueueFullError(f"{queued} requests are already waiting (max_queued_requests="
                                     f"{self.max_queued_requests}): retry later")
            ids = [r.request_id for r in requests]
            if len(set(ids)) != len(ids) or any(rid in self._tracks for rid in ids):
                raise ValueError("request ids must be unique among requests in flight")
            group = RequestGroup(self, ids, deadline)
            for r in requests:
                self._tracks[r.request_id] = _Track(group)
                self._commands.append(("add", r))
            self._cond.notify()
        return group

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str) -> RequestGroup:
        """Validate, tokenize and queue one request; iterate the group for its outputs."""
        return self.submit([self.make_request(prompt, params, request_id)])

    def generate(self, prompt: PromptType, params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs: `async for out in engine.generate(...)`.

        A plain method (not `async def`) so that validation, QueueFullError and EngineDeadError are
        raised at the call, before anything is queued; the returned iterator aborts the request in its
        `finally` when it is closed or cancelled early (client disconnect).
        """
        return _iterate(self.add_request(prompt, params, request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its KV blocks are freed at the next step."""
        track = self._tracks.get(request_id)
        if track is None or track.detached:
            return
        track.detached = True
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._failure())
        if self._stopping:
            raise EngineDeadError(SHUTTING_DOWN)
        if self._thread is None:
            raise EngineDeadError("the engine is not started")

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        busy = False
        s = self.stats  # prompt + generated tokens processed so far, for the per-step count
        tokens_so_far = s.prompt_tokens + s.generation_tokens if s is not None else 0
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not busy:
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                    self._num_waiting += sum(1 for kind, _ in commands if kind == "add")
                outputs = self._apply(commands)
                if eng.has_unfinished_requests():
                    outputs.extend(self._step())
                stats = eng.stats()
                step_tokens = stats.prompt_tokens + stats.generation_tokens - tokens_so_far
                tokens_so_far += step_tokens
                busy = eng.has_unfinished_requests()
                with self._cond:
                    self._num_waiting = stats.num_waiting
                now = time.monotonic()
                for out in outputs:  # private copies: the engine keeps mutating its own
                    if out.metrics is not None:
                        out.metrics = replace(out.metrics)
                        if out.finished and out.metrics.finished_time is None:
                            out.metrics.finished_time = now
                latencies, eng.scheduler.latencies = eng.scheduler.latencies, []
                self._post(self._deliver, outputs, stats, latencies, step_tokens)
        except BaseException as e:  # noqa: BLE001 - any escape kills the loop: report, never hang clients
            logger.exception("engine loop died")
            self._dead = e
            self._post(self._fail_all, EngineDeadError(self._failure()))
            self._stop_engine()
            return
        for rid in eng.request_ids:  # shutdown: free everything
            with contextlib.suppress(Exception):
                eng.abort_request(rid)
        with contextlib.suppress(Exception):
            self._post(self._set_stats, eng.stats())
        self._stop_engine()

    def _step(self) -> list[RequestOutput]:
        """One engine step. An error no single request could be blamed for fails the requests in flight,
        not the loop: the server keeps serving. Only a dead tensor-parallel group stops it."""
        try:
            return self.engine.step()
        except WorkerDiedError:
            raise
        except Exception:
            logger.exception("engine step failed; failing the requests in flight")
            return self.engine.fail_all("the engine could not run this request")

    def _stop_engine(self) -> None:
        """Release what the engine holds outside this process (tensor-parallel workers)."""
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            try:
                stop()
            except Exception:
                logger.exception("engine shutdown failed")

    def _apply(self, commands: list[tuple[str, Request | str]]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for kind, arg in commands:
            if kind == "add":
                assert isinstance(arg, Request)
                try:
                    self.engine.add_built_request(arg)
                except ValueError as e:  # e.g. a duplicate id: fail this request only
                    outputs.append(_failed_output(arg, str(e)))
                except Exception:
                    logger.exception("adding request %s failed", arg.request_id)
                    outputs.append(_failed_output(arg, "the request could not be queued"))
            else:
                assert isinstance(arg, str)
                out = self.engine.abort_request(arg)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _post(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
            loop.call_soon_threadsafe(fn, *args)

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    # ---- delivery (event loop side) ----------------------------------------------------------------
    def _set_stats(self, stats: EngineStats) -> None:
        self.stats = stats

    def _deliver(self, outputs: list[RequestOutput], stats: EngineStats,
                 latencies: list[tuple[bool, float]] = (), step_tokens: int = 0) -> None:  # type: ignore[assignment]
        self.stats = stats
        if self.observer is not None:  # per token, measured in the engine: also for non-streamed requests
            try:
                if step_tokens > 0:
                    self.observer.observe_iteration_tokens(step_tokens)
                for first, seconds in latencies:
                    if first:
                        self.observer.observe_first_token(seconds)
                    else:
                        self.observer.observe_inter_token(seconds)
            except Exception:  # metrics must never break serving
                logger.exception("metrics observer failed")
        for out in outputs:
            track = self._tracks.get(out.request_id)
            if track is None:
                continue
            if self.observer is not None:
                try:
                    self._observe(track, out)
                except Exception:  # metrics must never break serving
                    logger.exception("metrics observer failed")
            if out.finished:
                del self._tracks[out.request_id]
            if not track.detached:
                track.group._put(out)

    def _observe(self, track: _Track, out: RequestOutput) -> None:
        obs, m = self.observer, out.metrics
        if obs is None or m is None:
            return
        if not track.scheduled_seen and m.first_scheduled_time is not None:
            track.scheduled_seen = True
            obs.observe_queue_time(m.first_scheduled_time - m.arrival_time)
        for c in out.outputs:
            track.generated[c.index] = track.generated.get(c.index, 0) + len(c.token_ids)
        if out.finished:
            end = m.finished_time if m.finished_time is not None else time.monotonic()
            obs.observe_finished(out.outputs[0].finish_reason or "error" if out.outputs else "error",
                                 end - m.arrival_time)
            first, start, last = m.first_token_time, m.first_scheduled_time, m.last_token_time
            obs.observe_request(FinishedRequestStats(
                prompt_tokens=len(out.prompt_token_ids), generation_tokens=sum(track.generated.values()),
                max_sample_tokens=max(track.generated.values(), default=0),
                prefill_seconds=first - start if first is not None and start is not None else None,
                decode_seconds=last - first if last is not None and first is not None else None,
                inference_seconds=last - start if last is not None and start is not None else None))

    def _fail_all(self, err: BaseException) -> None:
        tracks, self._tracks = self._tracks, {}
        groups = {id(t.group): t.group for t in tracks.values() if not t.detached}
        for group in groups.values():
            group._put(err)


async def _iterate(group: RequestGroup) -> AsyncIterator[RequestOutput]:
    try:
        async for out in group:
            yield out
    finally:
        group.abort()


def _failed_output(req: Request, message: str) -> RequestOutput:
    comp = CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [comp], finished=True,
                         metrics=req.metrics, error=message)
