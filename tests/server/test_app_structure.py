"""The app's OpenAPI request bodies come from the protocol models, and engine validation errors name
their field through InvalidParameterError (no guessing from the message). In-process app, no server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.errors import InvalidParameterError
from engine.sampling_params import SamplingParams
from server import protocol as P
from server.errors import invalid_parameter

BODIES = {"/v1/completions": P.CompletionRequest, "/v1/chat/completions": P.ChatCompletionRequest,
          "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest}


@pytest.fixture(scope="module")
def app(tiny_model: Path) -> Iterator[Any]:
    import torch

    from engine.async_engine import AsyncLLMEngine
    from server.app import build_app
    from tests.server.test_async_engine import make_engine

    threads = torch.get_num_threads()
    loop = asyncio.new_event_loop()  # one loop for the engine's outputs and every call
    eng = AsyncLLMEngine(make_engine(tiny_model))
    app = build_app(eng, ["tiny"], api_key="k")
    app.state.loop = loop
    eng.start(loop)
    try:
        yield app
    finally:
        eng.shutdown()
        loop.close()
        torch.set_num_threads(threads)


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"Authorization": "Bearer k"}) as c:
            return await c.request(method, path, **kw)

    return app.state.loop.run_until_complete(go())


def test_openapi_bodies_come_from_the_models(app: Any) -> None:
    doc = call(app, "GET", "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in BODIES.items():
        op = doc["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.rpartition("/")[2]]
        want = model.model_json_schema()
        assert set(schema["properties"]) == set(model.model_fields), path
        assert sorted(schema.get("required", [])) == sorted(want.get("required", [])), path
        assert schema.get("additionalProperties") is False, path  # extra="forbid"
        assert op["security"] == [{"bearer": []}] and "401" in op["responses"], path
        assert "422" not in op["responses"], path  # validation errors are 400s here
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert schemas["DetokenizeRequest"]["required"] == ["tokens"]
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "HTTPValidationError" not in schemas


def test_validation_error_is_400_naming_the_field(app: Any) -> None:
    r = call(app, "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    r = call(app, "POST", "/tokenize", json={"prompt": "hi", "nope": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "nope", r.text


def test_sampling_params_error_inside_the_engine_names_the_field(app: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine validates SamplingParams itself (LLMEngine.make_request): its InvalidParameterError's
    param is what the 400 names, whatever the message says."""
    engine = app.state.engine
    make = engine.make_request

    def engine_sees(prompt: Any, params: SamplingParams, rid: str) -> Any:
        params.top_p = 1.5  # valid when the server built it; the engine's validate() must catch it
        return make(prompt, params, rid)

    monkeypatch.setattr(engine, "make_request", engine_sees)
    for path, body, prompt_field in (
            ("/v1/completions", {"prompt": "To be", "max_tokens": 2}, "prompt"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "messages")):
        r = call(app, "POST", path, json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "top_p" and "top_p" in err["message"], r.text

        def renamed(prompt: Any, params: SamplingParams, rid: str) -> Any:
            raise InvalidParameterError("the text is too long for this model", "prompt")

        with monkeypatch.context() as m:
            m.setattr(engine, "make_request", renamed)
            r = call(app, "POST", path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == prompt_field, r.text


def test_invalid_parameter_mapping() -> None:
    fields = list(P.ChatCompletionRequest.model_fields)
    e = InvalidParameterError("no field named first", "top_p")
    assert invalid_parameter(e, fields, "messages").param == "top_p"
    assert invalid_parameter(InvalidParameterError("x", "logprobs"), fields, "messages",
                             {"logprobs": "top_logprobs"}).param == "top_logprobs"
    assert invalid_parameter(InvalidParameterError("x", "prompt_token_ids"), fields, "messages").param == "messages"
    assert invalid_parameter(InvalidParameterError("x", "not_a_field"), fields, "messages").param is None
    # a plain ValueError (engine code not converted yet): the message's first word, if it is a field
    assert invalid_parameter(ValueError("stop_token_ids names token 9"), fields, "messages").param == "stop_token_ids"
    assert invalid_parameter(ValueError("prompt (300 tokens) + ..."), fields, "messages").param == "messages"
    assert invalid_parameter(ValueError("something else"), fields, "messages").param is None
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(top_p=1.5)
    assert info.value.param == "top_p" and isinstance(info.value, ValueError)
