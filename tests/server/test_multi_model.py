"""Several models behind one server (`depthserve serve --model A --model B`): routing by `model`, the same
greedy answers as one-model servers, metrics labelled by model, a 404 naming the served models, and the
memory budgets split between the engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, metric, scrape

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny import tiny_config, write_tiny

    folder = tmp_path_factory.mktemp("tiny-residual")
    write_tiny(folder, tiny_config("none"), seed=1, tokenizer_from=tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def two_models(tiny_model: Path, residual_model: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_model, "--model", str(residual_model), "--served-model-name", "attnres", "residual",
                       "--log-level", "info", "--log-stats-interval", "0.2",
                       log_dir=tmp_path_factory.mktemp("multi-logs")) as srv:
        yield srv


def _greedy(url: str, model: str) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12,
                                                   "temperature": 0, "logprobs": 1}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["model"] == model
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"]}


def test_each_model_answers_as_it_does_alone(two_models: ServerProcess, tiny_model: Path, residual_model: Path,
                                             tmp_path: Path) -> None:
    both = {name: _greedy(two_models.url, name) for name in ("attnres", "residual")}
    assert both["attnres"] != both["residual"]  # really two models
    for folder, name in ((tiny_model, "attnres"), (residual_model, "residual")):
        with ServerProcess(folder, "--served-model-name", name, log_dir=tmp_path) as alone:
            assert _greedy(alone.url, name) == both[name]
    chat = httpx.post(two_models.url + "/v1/chat/completions", timeout=60, json={
        "model": "residual", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["model"] == "residual"
    # no `model`: the first one, as a one-model server does
    r = httpx.post(two_models.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0},
                   timeout=60)
    assert r.json()["model"] == "attnres" and r.json()["choices"][0]["text"] == both["attnres"]["text"]


def test_models_listed_and_unknown_model_is_404(two_models: ServerProcess, tiny_model: Path,
                                                residual_model: Path) -> None:
    cards = httpx.get(two_models.url + "/v1/models").json()["data"]
    assert [(c["id"], c["root"]) for c in cards] == [("attnres", tiny_model.name), ("residual", residual_model.name)]
    for path, body in (("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
                       ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {"model": "gpt-4", "prompt": "x"})):
        r = httpx.post(two_models.url + path, json=body)
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and "attnres, residual" in err["message"]
    assert httpx.get(two_models.url + "/tokenizer_info", params={"model": "gpt-4"}).status_code == 404
    info = httpx.get(two_models.url + "/tokenizer_info", params={"model": "residual"})
    assert info.status_code == 200 and info.json()["bos_token"] == "<s>"


def test_metrics_carry_each_model_name(two_models: ServerProcess) -> None:
    _greedy(two_models.url, "residual")
    samples = scrape(two_models.url)
    for name in ("attnres", "residual"):
        assert f'depthserve:num_requests_running{{model_name="{name}"}}' in samples
        assert f'depthserve:e2e_request_latency_seconds_count{{model_name="{name}"}}' in samples
    assert metric(samples, "depthserve:generation_tokens_total", model_name="residual") >= 12
    assert metric(samples, "depthserve:depth_cache_bytes", model_name="residual") == 0  # a standard model
    assert metric(samples, "depthserve:depth_cache_bytes", model_name="attnres") > 0
    # every line of the exposition has the label (one HELP/TYPE per family, both models' samples in it)
    text = httpx.get(two_models.url + "/metrics").text
    lines = [x for x in text.splitlines() if x.startswith("depthserve:")]
    assert lines and all('model_name="' in x for x in lines)
    assert text.count("# TYPE depthserve:num_requests_running ") == 1
    # issue 18's metrics, per model: request histograms, cache_config_info, and no _created series
    assert "_created" not in text
    for name in ("attnres", "residual"):
        assert metric(samples, "depthserve:request_generation_tokens_sum", model_name=name) >= 0
        assert any(k.startswith("depthserve:cache_config_info{") and f'model_name="{name}"' in k
                   and 'num_gpu_blocks="' in k for k in samples)
    assert metric(samples, "depthserve:request_generation_tokens_sum", model_name="residual") >= 12
    assert metric(samples, "depthserve:request_prefill_time_seconds_count", model_name="residual") >= 1
    assert metric(samples, "depthserve:iteration_tokens_total_count", model_name="residual") >= 1


def test_stats_lines_name_their_model(two_models: ServerProcess) -> None:
    import time

    for name in ("attnres", "residual"):
        _greedy(two_models.url, name)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(f"{n}: Avg prompt throughput" in two_models.log()
                                                  for n in ("attnres", "residual")):
        time.sleep(0.1)
    log = two_models.log()
    assert "attnres: Avg prompt throughput" in log and "residual: Avg prompt throughput" in log
    assert "API key auth: off" in log and "2 models: attnres" in log


def test_memory_budgets_add_up(tiny_model: Path, residual_model: Path, one_thread: None) -> None:
    from engine.arg_utils import EngineArgs
    from engine.config import parse_bytes
    from engine.llm_engine import LLMEngine
    from engine.model_runner import kv_bytes_per_block
    from server.multi_model import plan_models

    models = [str(tiny_model), str(residual_model), str(tiny_model)]
    base = EngineArgs(model=models[0], kv_cache_memory="12MiB", depth_cache_memory="6MiB", num_threads=1,
                      device="cpu")
    plans = plan_models(base, models, ["a", "r", "b"])
    assert [p.config.cache.kv_cache_memory for p in plans] == [4 << 20] * 3
    assert [p.config.cache.depth_cache_memory for p in plans] == [2 << 20] * 3
    kv_total = depth_total = 0
    for p in plans:
        eng = LLMEngine(p.config)
        try:
            kv_total += eng.kv.num_blocks * kv_bytes_per_block(eng.model_config, eng.config.dtype,
                                                               p.config.cache.block_size, 1)
            depth_total += eng.depth.bytes if eng.depth is not None else 0
            assert (eng.depth.bytes if eng.depth is not None else 0) <= p.config.cache.depth_cache_memory
        finally:
            eng.shutdown()
    assert 0 < kv_total <= parse_bytes("12MiB") and 0 < depth_total <= parse_bytes("6MiB")
    # one budget per model, in --model order; the CPU default (1 GiB) is the total
    per = plan_models(base.__class__(**{**base.__dict__, "kv_cache_memory": "6MiB,2MiB,4MiB"}), models,
                      ["a", "r", "b"])
    assert [p.config.cache.kv_cache_memory for p in per] == [6 << 20, 2 << 20, 4 << 20]
    default = plan_models(EngineArgs(model=models[0], device="cpu"), models[:2])
    assert sum(p.config.cache.kv_cache_memory or 0 for p in default) == 1 << 30
    assert [p.name for p in default] == [tiny_model.name, residual_model.name]


@pytest.mark.parametrize(("names", "kv", "message"), [
    (["a"], None, "1 names for 2 models"),
    (["a", "a"], None, "two models would be served as 'a'"),
    (None, None, "two models would be served as"),  # the same folder twice, no names
    (["a", "b"], "1MiB,2MiB,3MiB", "3 sizes for 2 models"),
])
def test_plan_errors_say_what_to_do(tiny_model: Path, names: list[str] | None, kv: str | None, message: str) -> None:
    from engine.arg_utils import EngineArgs
    from server.multi_model import plan_models

    with pytest.raises(ValueError, match=message):
        plan_models(EngineArgs(model=str(tiny_model), kv_cache_memory=kv, device="cpu"),
                    [str(tiny_model)] * 2, names)


def test_cuda_models_share_gpu_memory_utilization(tiny_model: Path, residual_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a KV budget on CUDA, the i-th of N engines profiles with u * i / N: each profile counts what the
    engines before it hold, so each model's weights, activations and KV get u / N of the GPU."""
    import torch

    from engine.arg_utils import EngineArgs
    from server.multi_model import plan_models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    models = [str(tiny_model), str(residual_model), str(tiny_model)]
    plans = plan_models(EngineArgs(model=models[0], device="cuda", gpu_memory_utilization=0.9), models, ["a", "r", "b"])
    assert [round(p.config.cache.gpu_memory_utilization, 6) for p in plans] == [0.3, 0.6, 0.9]
    assert all(p.config.cache.kv_cache_memory is None for p in plans)
    fixed = plan_models(EngineArgs(model=models[0], device="cuda", kv_cache_memory="3GiB"), models, ["a", "r", "b"])
    assert [p.config.cache.kv_cache_memory for p in fixed] == [1 << 30] * 3  # a budget: split, not profiled
    assert {p.config.cache.gpu_memory_utilization for p in fixed} == {0.9}


def test_cli_says_budgets_are_totals(tiny_model: Path, residual_model: Path, one_thread: None,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    assert main(["serve", "--model", str(tiny_model), "--model", str(residual_model), "--kv-cache-memory", "64KiB",
                 "--num-threads", "1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"model {tiny_model.name}:" in err and "totals, split evenly" in err


def test_health_names_the_model_whose_engine_stopped(tiny_model: Path, residual_model: Path,
                                                     one_thread: None) -> None:
    """In-process app of two engines: /health is ok while both serve, a 503 naming the model once one stops, and
    the other keeps answering."""
    import asyncio

    from engine.async_engine import AsyncLLMEngine
    from server.app import build_app
    from tests.server.test_async_engine import make_engine

    loop = asyncio.new_event_loop()
    engines = {"attnres": AsyncLLMEngine(make_engine(tiny_model)), "residual": AsyncLLMEngine(make_engine(residual_model))}
    app = build_app(engines)

    async def get(path: str, **kw: object) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await (c.post(path, **kw) if kw else c.get(path))  # type: ignore[arg-type]

    for e in engines.values():
        e.start(loop)
    try:
        assert loop.run_until_complete(get("/health")).status_code == 200
        engines["residual"].shutdown()
        r = loop.run_until_complete(get("/health"))
        assert r.status_code == 503 and r.json()["error"]["message"].startswith("model residual: ")
        ok = loop.run_until_complete(get("/v1/completions", json={"model": "attnres", "prompt": "To be",
                                                                   "max_tokens": 2}))
        assert ok.status_code == 200, ok.text
    finally:
        for e in engines.values():
            e.shutdown()
        loop.close()


def test_cli_takes_one_positional_model_or_several_model_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import apply_model_tag, serve_parser

    def parse(*argv: str):  # type: ignore[no-untyped-def]
        p = serve_parser()
        return apply_model_tag(p.parse_args(list(argv)), p)

    one = parse("./a")
    assert one.model == "./a" and not one.models
    assert parse("--model", "./a", "--model", "./b").models == ["./a", "./b"]
    assert parse("./a", "--model", "./a").model == "./a"
    with pytest.raises(SystemExit) as e:
        parse("./a", "--model", "./b", "--model", "./c")
    assert e.value.code == 2 and "give every model with --model" in capsys.readouterr().err


def test_metrics_add_model_observes_every_histogram() -> None:
    from engine.async_engine import FinishedRequestStats
    from server.metrics import ServerMetrics

    info = {"block_size": 16, "num_gpu_blocks": 10}
    m = ServerMetrics(lambda: None, "a", max_model_len=256, cache_info=info)
    b = m.add_model(lambda: None, "b", cache_info={**info, "num_gpu_blocks": 20})
    b.observe_request(FinishedRequestStats(prompt_tokens=7, generation_tokens=5, max_sample_tokens=5,
                                           prefill_seconds=0.1, decode_seconds=0.2, inference_seconds=0.3))
    b.observe_inter_token(0.01)
    b.observe_iteration_tokens(12)
    text = m.render()[0].decode()
    for series in ("request_prompt_tokens_sum", "request_generation_tokens_count", "time_per_output_token_seconds_count",
                   "request_prefill_time_seconds_count", "request_decode_time_seconds_count",
                   "request_inference_time_seconds_count", "request_max_num_generation_tokens_count",
                   "iteration_tokens_total_count"):
        assert f'depthserve:{series}{{model_name="b"}} 1.0' in text or \
            f'depthserve:{series}{{model_name="b"}} 7.0' in text, series
        assert f'depthserve:{series}{{model_name="a"}} 0.0' in text, series
    assert 'model_name="a",num_gpu_blocks="10"' in text and 'model_name="b",num_gpu_blocks="20"' in text
    assert "_created" not in text
    with pytest.raises(ValueError, match="already"):
        m.add_model(lambda: None, "b")


def test_every_model_gets_the_tool_call_parser(tiny_model: Path, residual_model: Path, one_thread: None) -> None:
    from engine.async_engine import AsyncLLMEngine
    from server.app import build_app
    from tests.server.test_async_engine import make_engine

    engines = {"attnres": AsyncLLMEngine(make_engine(tiny_model)), "residual": AsyncLLMEngine(make_engine(residual_model))}
    try:
        app = build_app(engines, tool_call_parser="hermes", enable_docs=True)
        assert [s.chat.tool_call_parser for s in app.state.models.served] == ["hermes", "hermes"]
        paths = {getattr(r, "path", None) for r in app.routes}
        assert {"/ping", "/version", "/docs", "/metrics", "/health"} <= paths
    finally:
        for e in engines.values():
            e.shutdown()
