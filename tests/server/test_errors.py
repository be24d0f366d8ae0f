"""Every client mistake gets OpenAI's error shape and the right status; never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30.0) as c:
        yield c


def check_error(r: httpx.Response, status: int, param: str | None = "any", contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert "Traceback" not in r.text
    if param != "any":
        assert err["param"] == param, err
    assert contains in err["message"], err
    return err


COMPLETION = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(("patch", "param", "contains"), [
    ({"max_tokens": "abc"}, "max_tokens", "integer"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"top_p": 1.5}, "top_p", "top_p"),
    ({"n": 0}, "n", "n must be"),
    ({"n": True}, "n", ""),
    ({"logprobs": 21}, "logprobs", "logprobs"),
    ({"max_token": 5}, "max_token", "unrecognized"),
    ({"stop": 3}, "stop", ""),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [1, 10_000]}, "prompt", "outside the vocabulary"),
    ({"prompt": None}, "prompt", ""),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101.0}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"99999": 1.0}}, "logit_bias", "outside the vocabulary"),
    ({"logit_bias": {"1" * 30: 1.0}}, "logit_bias", "token ids"),
    ({"stop_token_ids": [10**30]}, "stop_token_ids", "outside the vocabulary"),
    ({"top_k": -2}, "top_k", "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"presence_penalty": 1e300}, "presence_penalty", "presence_penalty"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens"),
    ({"seed": 2**64}, "seed", "64-bit"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty"),
    ({"prompt": [1, "a"]}, "prompt", "one of"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
    ({"max_tokens": 0, "logprobs": 1}, "max_tokens", "echo"),
])
def test_completion_400(http: httpx.Client, patch: dict, param: str, contains: str) -> None:
    check_error(http.post("/v1/completions", json={**COMPLETION, **patch}), 400, param, contains)


@pytest.mark.parametrize(("patch", "param", "contains"), [
    ({"messages": []}, "messages", ""),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "text"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": "g"}}},
     "tool_choice", "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools.0.function.name", "function name"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one"),
    ({"max_tokens": 300}, "messages", "300"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "prompt_logprobs"),
])
def test_chat_400(http: httpx.Client, patch: dict, param: str, contains: str) -> None:
    check_error(http.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param, contains)


def test_context_overflow_names_both_numbers(http: httpx.Client) -> None:
    ids = list(range(3, 203))  # 200 prompt tokens + 100 > 256
    err = check_error(http.post("/v1/completions", json={**COMPLETION, "prompt": ids, "max_tokens": 100}), 400)
    assert "200" in err["message"] and "100" in err["message"] and "256" in err["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b'"text"'])
def test_malformed_bodies_are_400(http: httpx.Client, body: bytes) -> None:
    check_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 400)


def test_auth(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers=headers)
        assert check_error(r, 401)["code"] == "invalid_api_key"
        check_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_model_and_route(http: httpx.Client) -> None:
    err = check_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404, "model", "gpt-4")
    assert err["code"] == "model_not_found"
    check_error(http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model")
    check_error(http.get("/v1/nothing"), 404)
    check_error(http.get("/v1/completions"), 405)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = json.dumps({**COMPLETION, "prompt": "x" * (80 << 10)}).encode()
    check_error(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server must count while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    check_error(http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)


def test_tokenize_errors(http: httpx.Client) -> None:
    check_error(http.post("/detokenize", json={"tokens": [5, 99_999]}), 400, "tokens", "vocabulary")
    check_error(http.post("/tokenize", json={}), 400, "prompt")


def test_dead_engine_is_503(tiny_model: Path, one_thread: None) -> None:
    """In-process app around an engine whose loop dies: the request, /health and later requests get 503
    saying so in the user's terms (no exception class or message)."""
    from engine.async_engine import AsyncLLMEngine
    from engine.parallel import WorkerDiedError
    from server.app import build_app
    from tests.server.test_async_engine import make_engine

    async def run() -> None:
        llm = make_engine(tiny_model)

        def broken_step() -> list:  # what stops the loop: a dead tensor-parallel worker
            raise WorkerDiedError("kaboom")

        llm.step = broken_step  # type: ignore[method-assign]
        eng = AsyncLLMEngine(llm)
        app = build_app(eng, ["tiny"])
        eng.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                assert (await c.get("/health")).status_code == 200
                for r in (await c.post("/v1/completions", json=COMPLETION), await c.get("/health")):
                    # the user's terms, not the exception's: its class and message stay in the server log
                    check_error(r, 503, contains="restart the server")
                    assert "kaboom" not in r.text and "RuntimeError" not in r.text, r.text
                check_error(await c.post("/v1/chat/completions", json={**CHAT, "stream": True}), 503)
        finally:
            eng.shutdown()

    asyncio.run(run())


# ---- hostile and odd inputs: each a 4xx with a message naming the problem, and the server fine after ----

def _raw(body: bytes, content_type: str = "application/json") -> tuple[bytes, str]:
    return body, content_type


BAD_INPUTS = [
    # (id, body or (raw bytes, content type), status, param, text in the message)
    ("nan-temperature", _raw(b'{"prompt": "To be", "max_tokens": 2, "temperature": NaN}'), 400, "temperature",
     "finite"),
    ("inf-temperature", _raw(b'{"prompt": "To be", "max_tokens": 2, "temperature": Infinity}'), 400, "temperature",
     "finite"),
    ("overflow-temperature", _raw(b'{"prompt": "To be", "max_tokens": 2, "temperature": 1e999}'), 400,
     "temperature", "finite"),
    ("negative-n", {"n": -1}, 400, "n", "n must be"),
    ("huge-max-tokens", {"max_tokens": 10**30}, 400, "prompt", "context length"),
    ("empty-string-prompt", {"prompt": ""}, 400, "prompt", "empty"),
    ("empty-string-in-batch", {"prompt": ["To be", ""]}, 400, "prompt", "empty"),
    ("negative-token-id", {"prompt": [5, -1]}, 400, "prompt", "outside the vocabulary"),
    ("huge-token-id", {"prompt": [5, 2**70]}, 400, "prompt", "outside the vocabulary"),
    ("invalid-utf8-in-string", _raw(b'{"prompt": "To \xff\xfe be", "max_tokens": 2}'), 400, None, "JSON"),
    ("lone-surrogate", _raw(b'{"prompt": "\\ud800", "max_tokens": 2}'), 400, None, "JSON"),
    ("deeply-nested", _raw(b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400, None, ""),
    ("unknown-nested-field", {"stream": True, "stream_options": {"include_usage": True, "extra": 1}},
     400, "stream_options.extra", "unrecognized"),
    ("top-k-wrong-type", {"top_k": "5"}, 400, "top_k", "integer"),
    ("too-many-stop-strings", {"stop": ["x"] * 65}, 400, "stop", "at most 64"),
    ("too-many-stop-token-ids", {"stop_token_ids": list(range(1025))}, 400, "stop_token_ids", "at most 1024"),
    ("text-plain-body", _raw(json.dumps(COMPLETION).encode(), "text/plain"), 415, None, "application/json"),
    ("form-body", _raw(b"prompt=hi", "application/x-www-form-urlencoded"), 415, None, "application/json"),
    ("model-as-path", {"model": "/etc/passwd"}, 404, "model", "does not exist"),
    ("model-as-relative-path", {"model": "../../models/builtin/shakespeare-attnres"}, 404, "model", "does not exist"),
    ("ten-megabytes", _raw(b'{"prompt": "' + b"a" * (10 << 20) + b'"}'), 413, None, "limit"),
]


@pytest.mark.parametrize(("body", "status", "param", "contains"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_then_normal_request(http: httpx.Client, body: dict | tuple[bytes, str], status: int,
                                       param: str | None, contains: str) -> None:
    if isinstance(body, tuple):
        r = http.post("/v1/completions", content=body[0], headers={"Content-Type": body[1]})
    else:
        r = http.post("/v1/completions", json={**COMPLETION, **body})
    err = check_error(r, status, param, contains)
    assert "site-packages" not in r.text and "File \"" not in err["message"]
    ok = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
    assert ok.status_code == 200, ok.text
