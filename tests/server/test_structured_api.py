"""Structured outputs and tool calls through the official `openai` client, on a tiny random model: whatever
the model would say, the grammar makes it valid."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL_NAME, ServerProcess

MESSAGES = [{"role": "user", "content": "Who comes to Verona?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Verona", "Mantua"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
DUEL = {"type": "function", "function": {
    "name": "duel", "parameters": {"type": "object", "properties": {"with": {"type": "string", "enum": ["Tybalt"]}},
                                   "required": ["with"], "additionalProperties": False}}}


class House(BaseModel):
    id: int = Field(ge=0, le=9)


class Character(BaseModel):
    name: Literal["Romeo", "Juliet", "Tybalt"]
    age: int = Field(ge=10, le=99)
    alive: bool
    house: House
    friends: list[Literal["Mercutio", "Benvolio"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.tiny import tiny_config, write_tiny

    folder = tmp_path_factory.mktemp("tiny-long-model")  # room for the tools' system prompt (~800 tokens)
    write_tiny(folder, tiny_config("block", block_size=2, layers=3, max_pos=2048), tokenizer_from=tokenizer_dir)
    with ServerProcess(folder, "--served-model-name", MODEL_NAME, "--max-num-seqs", "8",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                       log_dir=tmp_path_factory.mktemp("structured-logs")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for seed in range(3):
        done = client.chat.completions.parse(model=MODEL_NAME, messages=MESSAGES, response_format=Character,
                                             temperature=1.0, seed=seed, max_tokens=120)
        msg = done.choices[0].message
        assert isinstance(msg.parsed, Character), msg.content
        assert done.choices[0].finish_reason == "stop"


def test_json_schema_on_completions_n_and_stream(client: openai.OpenAI) -> None:
    schema = Character.model_json_schema()  # made strict as openai's parse() does: no other keys
    schema["additionalProperties"] = schema["$defs"]["House"]["additionalProperties"] = False
    rf = {"type": "json_schema", "json_schema": {"name": "character", "schema": schema, "strict": True}}
    out = client.completions.create(model=MODEL_NAME, prompt="ROMEO.", n=3, temperature=1.0, seed=5,
                                    max_tokens=120, extra_body={"response_format": rf})
    for c in out.choices:
        Character.model_validate_json(c.text)
    chunks = client.completions.create(model=MODEL_NAME, prompt="ROMEO.", temperature=1.0, seed=5, max_tokens=120,
                                       stream=True, extra_body={"response_format": rf})
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == out.choices[0].text


@pytest.mark.parametrize(("extra", "ok"), [
    ({"guided_choice": ["Montague", "Capulet"]}, lambda t: t in ("Montague", "Capulet")),
    ({"guided_regex": r"[A-Z][a-z]{2,5} [0-9]{1,2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{2,5} [0-9]{1,2}", t)),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": "(ay|nay)!"}}, lambda t: t in ("ay!", "nay!")),
    ({"structured_outputs": {"grammar": 'root ::= "act " [1-5]'}}, lambda t: re.fullmatch("act [1-5]", t)),
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["n"], "additionalProperties": False}},
     lambda t: 0 <= json.loads(t)["n"] <= 9),
])
def test_vllm_fields(client: openai.OpenAI, extra: dict, ok) -> None:  # type: ignore[no-untyped-def]
    out = client.completions.create(model=MODEL_NAME, prompt="JULIET.", n=2, temperature=1.0, seed=1,
                                    max_tokens=40, extra_body=extra)
    for c in out.choices:
        assert c.finish_reason == "stop" and ok(c.text), c.text
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.0, max_tokens=40,
                                          extra_body=extra)
    assert ok(chat.choices[0].message.content)


@pytest.mark.parametrize(("body", "param", "contains"), [
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "regex"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json", "json"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "grammar"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format", "json"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs", "unknown"),
    ({"guided_regex": "a" * 70000}, "guided_regex", "characters"),
])
def test_bad_constraints_are_400_naming_the_field(server: ServerProcess, body: dict, param: str,
                                                  contains: str) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and contains in err["message"], err


def _args(call) -> dict:  # type: ignore[no-untyped-def]
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Verona", "Mantua") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
    return args


def test_named_tool_choice_and_its_stream(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, DUEL],
                                          tool_choice=choice, temperature=0.0, max_tokens=60)
    c = full.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    _args(call)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, DUEL],
                                            tool_choice=choice, temperature=0.0, max_tokens=60, stream=True)
    name, args, reasons = None, "", []
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            reasons.append(ch.finish_reason)
    assert (name, args) == (call.function.name, call.function.arguments) and reasons[-1] == "tool_calls"


def test_required_tool_choice_and_its_stream(client: openai.OpenAI) -> None:
    for seed in range(3):
        kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, DUEL], tool_choice="required",
                  temperature=1.0, seed=seed, max_tokens=100, parallel_tool_calls=False)
        c = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        if call.function.name == "get_weather":
            _args(call)
        else:
            assert json.loads(call.function.arguments) == {"with": "Tybalt"}
        calls: dict[int, list[str]] = {}
        for chunk in client.chat.completions.create(**kw, stream=True):  # type: ignore[call-overload]
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    got = calls.setdefault(tc.index, ["", ""])
                    got[0] += tc.function.name or ""
                    got[1] += tc.function.arguments or ""
        assert calls == {0: [call.function.name, call.function.arguments]}


def test_tool_results_go_back_through_the_template(client: openai.OpenAI) -> None:
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Verona", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER], tool_choice="none",
                                         temperature=0.0, max_tokens=5)
    assert out.choices[0].message.tool_calls in (None, [])


def test_auto_tool_choice_parses_hermes_calls_streamed_or_not(client: openai.OpenAI) -> None:
    # a regex makes the tiny model write a Hermes call, as a tool-trained model would on its own
    said = 'Let me see. <tool_call>{"name": "get_weather", "arguments": {"city": "Verona", "days": 2}}</tool_call>'
    kw = dict(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER, DUEL], temperature=0.0, max_tokens=200,
              extra_body={"structured_outputs": {"regex": re.escape(said)}})
    c = client.chat.completions.create(**kw).choices[0]  # type: ignore[call-overload]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me see."
    [call] = c.message.tool_calls
    assert call.function.name == "get_weather" and _args(call) == {"city": "Verona", "days": 2}
    content, calls = "", {}
    for chunk in client.chat.completions.create(**kw, stream=True):  # type: ignore[call-overload]
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                got = calls.setdefault(tc.index, ["", ""])
                got[0] += tc.function.name or ""
                got[1] += tc.function.arguments or ""
            last = ch.finish_reason
    assert content.strip() == "Let me see." and last == "tool_calls"
    assert calls == {0: [call.function.name, call.function.arguments]}
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=[WEATHER], max_tokens=30,
                                           temperature=0.0, extra_body={"guided_choice": ["No tools today."]})
    assert plain.choices[0].message.content == "No tools today." and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"
