"""AsyncLLMEngine in-process: streaming, validation before queueing, abort on cancel, queue bound, death."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from engine.arg_utils import EngineArgs
from engine.async_engine import SERVER_SMALL_STEP_ROWS, AsyncLLMEngine, EngineDeadError, QueueFullError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutputKind
from engine.parallel import WorkerDiedError
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def make_engine(model: Path, max_num_seqs: int = 4) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(model), num_threads=1, kv_cache_memory="8MiB", depth_cache_memory="8MiB",
                                max_num_seqs=max_num_seqs).create_engine_config())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def observe_queue_time(self, seconds: float) -> None:
        self.events.append(("queue", seconds))

    def observe_first_token(self, seconds: float) -> None:
        self.events.append(("ttft", seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self.events.append(("itl", seconds))

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        self.events.append(("finished", finish_reason))

    def observe_request(self, stats: object) -> None:
        self.events.append(("request", stats))

    def observe_iteration_tokens(self, tokens: int) -> None:
        self.events.append(("iteration", tokens))

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)


async def wait_until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_stream_matches_offline_and_feeds_metrics(tiny_model: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    offline = make_engine(tiny_model)
    offline.add_request("To be, or not", replace(greedy, output_kind=RequestOutputKind.FINAL_ONLY), "ref")
    ref = None
    while offline.has_unfinished_requests():
        ref = next((o for o in offline.step() if o.finished), ref)
    assert ref is not None

    async def run() -> tuple[list[int], str, Recorder]:
        rec = Recorder()
        eng = AsyncLLMEngine(make_engine(tiny_model), observer=rec)
        eng.start()
        try:
            ids, text, last = [], "", None
            async for out in eng.generate("To be, or not", greedy, "a"):
                ids += out.outputs[0].token_ids
                text += out.outputs[0].text
                last = out
            assert last is not None and last.finished and last.outputs[0].finish_reason == "length"
            assert eng.stats is not None and eng.stats.kv_blocks_held == 0
            return ids, text, rec
        finally:
            eng.shutdown()

    ids, text, rec = asyncio.run(run())
    assert ids == ref.outputs[0].token_ids and text == ref.outputs[0].text
    assert rec.count("ttft") == 1 and rec.count("itl") == 5 and rec.count("queue") == 1
    assert ("finished", "length") in rec.events
    (stats,) = [s for kind, s in rec.events if kind == "request"]
    assert stats.prompt_tokens == len(ref.prompt_token_ids)
    assert stats.generation_tokens == stats.max_sample_tokens == 6
    assert stats.prefill_seconds >= 0 and stats.decode_seconds >= 0
    assert stats.inference_seconds == pytest.approx(stats.prefill_seconds + stats.decode_seconds)
    steps = [t for kind, t in rec.events if kind == "iteration"]
    assert sum(steps) == len(ref.prompt_token_ids) + 6 and len(steps) >= 6  # prefill, then one token a step


def test_request_stats_count_every_sample(tiny_model: Path) -> None:
    async def run() -> Recorder:
        rec = Recorder()
        eng = AsyncLLMEngine(make_engine(tiny_model), observer=rec)
        eng.start()
        try:
            params = SamplingParams(n=3, max_tokens=4, ignore_eos=True, seed=1)
            async for _ in eng.generate("To be", params, "n3"):
                pass
            return rec
        finally:
            eng.shutdown()

    (stats,) = [s for kind, s in asyncio.run(run()).events if kind == "request"]
    assert stats.generation_tokens == 12 and stats.max_sample_tokens == 4


def test_validation_errors_raise_before_queueing(tiny_model: Path) -> None:
    async def run() -> None:
        eng = AsyncLLMEngine(make_engine(tiny_model))
        eng.start()
        try:
            with pytest.raises(ValueError, match="exceeds the model's context"):
                eng.generate("hello", SamplingParams(max_tokens=10_000), "too-long")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                eng.generate([1, 10_000], SamplingParams(), "bad-id")
            with pytest.raises(ValueError, match="empty"):
                eng.generate([], SamplingParams(), "empty")
            assert not eng._commands and not eng._tracks
        finally:
            eng.shutdown()

    asyncio.run(run())


def test_cancelled_stream_aborts_and_frees_kv(tiny_model: Path) -> None:
    async def run() -> None:
        rec = Recorder()
        eng = AsyncLLMEngine(make_engine(tiny_model), observer=rec)
        eng.start()
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True)

            async def consume() -> None:
                async for _ in eng.generate("All the world's a stage", params, "long"):
                    pass

            task = asyncio.create_task(consume())
            await wait_until(lambda: eng.stats is not None and eng.stats.kv_blocks_held > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: eng.stats.kv_blocks_held == 0 and eng.stats.num_running == 0)
            await wait_until(lambda: ("finished", "abort") in rec.events)
            assert not eng._tracks

            stream = eng.generate("Now is the winter", params, "closed")  # closed after one output
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]
            await wait_until(lambda: eng.stats.kv_blocks_held == 0 and not eng._tracks)
        finally:
            eng.shutdown()

    asyncio.run(run())


def test_queue_bound_raises_queue_full(tiny_model: Path) -> None:
    async def run() -> None:
        eng = AsyncLLMEngine(make_engine(tiny_model, max_num_seqs=1), max_queued_requests=2)
        eng.start()
        try:
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            streams = []
            with pytest.raises(QueueFullError, match="max_queued_requests=2"):
                for i in range(10):
                    streams.append(eng.generate("To be", params, f"r{i}"))
            assert 2 <= len(streams) < 10
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
        finally:
            eng.shutdown()

    asyncio.run(run())


def test_dead_loop_fails_streams_and_reports_unhealthy(tiny_model: Path) -> None:
    async def run() -> None:
        llm = make_engine(tiny_model)

        def broken_step() -> list:  # what stops the loop: a dead tensor-parallel worker
            raise WorkerDiedError("boom")

        llm.step = broken_step  # type: ignore[method-assign]
        eng = AsyncLLMEngine(llm)
        eng.start()
        assert eng.is_healthy
        with pytest.raises(EngineDeadError, match="restart the server"):  # for clients: no internals
            async for _ in eng.generate("To be", SamplingParams(max_tokens=4), "x"):
                pass
        assert not eng.is_healthy and "boom" in str(eng.dead_error)
        with pytest.raises(EngineDeadError):
            eng.generate("To be", SamplingParams(max_tokens=4), "y")
        eng.shutdown()

    asyncio.run(run())


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(tiny_model: Path) -> None:
    async def run() -> None:
        llm = make_engine(tiny_model)
        step = llm.step
        calls = []

        def fails_once() -> list:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return step()

        llm.step = fails_once  # type: ignore[method-assign]
        eng = AsyncLLMEngine(llm)
        eng.start()
        try:
            outs = [o async for o in eng.generate("To be", SamplingParams(max_tokens=4), "x")]
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error" and outs[-1].error
            assert "boom" not in outs[-1].error  # details are for the log
            assert eng.is_healthy
            outs = [o async for o in eng.generate("To be", SamplingParams(max_tokens=4, ignore_eos=True), "y")]
            assert outs[-1].outputs[0].finish_reason == "length"
            assert sum(len(o.outputs[0].token_ids) for o in outs) == 4  # DELTA outputs: one token each
        finally:
            eng.shutdown()

    asyncio.run(run())


def test_shutdown_stops_thread_and_fails_open_streams(tiny_model: Path) -> None:
    async def run() -> None:
        eng = AsyncLLMEngine(make_engine(tiny_model))
        eng.start()
        gen = eng.generate("To be", SamplingParams(max_tokens=200, ignore_eos=True), "s")
        first = await gen.__anext__()
        assert first.outputs[0].token_ids
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in gen:
                pass
        assert eng.stats is not None and eng.stats.kv_blocks_held == 0
        assert not any(t.name == "depthserve-engine" for t in threading.enumerate())
        assert not eng.is_healthy
        with pytest.raises(EngineDeadError):
            eng.generate("To be", SamplingParams(), "after")

    asyncio.run(run())


def test_small_decode_steps_run_on_one_thread_under_the_server(tiny_model: Path) -> None:
    """The server gives small pure-decode steps one thread (its event loop keeps a core); offline keeps all, and
    prompt chunks, larger batches and verification rows (more tokens than requests) always use all."""
    def engine(**kw: int) -> LLMEngine:
        return LLMEngine(EngineArgs(model=str(tiny_model), num_threads=2, kv_cache_memory="8MiB",
                                    depth_cache_memory="8MiB", **kw).create_engine_config())

    offline = engine()
    assert offline.num_threads == 2 and offline.small_step_rows == 0 and offline._step_threads(1, 1) == 2
    served = AsyncLLMEngine(engine()).engine
    assert served.small_step_rows == SERVER_SMALL_STEP_ROWS == 2
    assert served._step_threads(1, 1) == served._step_threads(2, 2) == 1
    assert served._step_threads(3, 3) == served._step_threads(2, 1) == served._step_threads(9, 1) == 2
    assert AsyncLLMEngine(engine(small_step_rows=0)).engine._step_threads(1, 1) == 2
