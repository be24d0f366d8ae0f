"""Tool-call parsing and streaming without a server: the Hermes format, its streamed deltas, plain templates."""

from __future__ import annotations

import json

import pytest

from server import protocol as P
from server.openai import tool_calls as T

TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "duel"}})
AUTO = T.ToolPlan("auto", TOOLS)
TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>\n'
        '<tool_call>[{"name": "duel", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Mantua"}}]'
        '</tool_call>')


def _calls(calls: list[P.ToolCall]) -> list[tuple[str | None, dict]]:
    return [(c.function.name, json.loads(c.function.arguments or "")) for c in calls]


def test_hermes_blocks_objects_and_lists() -> None:
    content, calls = T.parse_hermes(TEXT)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Verona"}), ("duel", {}), ("get_weather", {"city": "Mantua"})]
    assert len({c.id for c in calls}) == 3 and all(c.id.startswith("call_") for c in calls)
    assert T.parse_hermes("no calls here") == ("no calls here", [])
    assert T.parse_hermes("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    # EOS before the closing tag still counts
    assert _calls(T.parse_hermes('<tool_call>{"name": "duel", "arguments": {}}')[1]) == [("duel", {})]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_auto_stream_reassembles_to_the_parsed_calls(step: int) -> None:
    ts = T.ToolStream(AUTO)
    content, calls = "", []
    pieces = [TEXT[i:i + step] for i in range(0, len(TEXT), step)]
    for k, piece in enumerate(pieces):
        c, tc = ts.feed(piece, final=k == len(pieces) - 1)
        content += c or ""
        calls += tc
    assert "<" not in content and content.strip() == "Let me check."
    assert [c.index for c in calls] == [0, 1, 2]
    assert _calls(calls) == _calls(T.parse_hermes(TEXT)[1])


def test_auto_stream_of_plain_text_and_a_false_start() -> None:
    ts = T.ToolStream(AUTO)
    out = [ts.feed(p, final=False)[0] for p in ("a <tool", "_c")]
    assert out == ["a ", None]  # "<tool" is held back: it may open a call
    assert ts.feed("at> b", final=True) == ("<tool_cat> b", [])


def test_named_and_required_streams() -> None:
    named = T.ToolStream(T.ToolPlan("named", TOOLS, name="duel"))
    first = named.feed('{"a"', final=False)[1]
    rest = named.feed(": 1}", final=True)[1]
    assert first[0].function.name == "duel" and first[0].id and first[0].index == 0
    assert "".join(c.function.arguments or "" for c in first + rest) == '{"a": 1}'
    req = T.ToolStream(T.ToolPlan("required", TOOLS))
    assert req.feed('[{"name": "duel", ', final=False) == (None, [])
    content, calls = req.feed('"parameters": {}}]', final=True)
    assert content is None and _calls(calls) == [("duel", {})]


def test_required_schema_allows_only_the_tools() -> None:
    schema = T.ToolPlan("required", TOOLS, parallel=False).spec().json  # type: ignore[union-attr]
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["duel"]]


def test_plain_template_gets_tools_and_past_calls() -> None:
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "duel", "arguments": '{"with": "Tybalt"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "won"}]
    out = T.for_plain_template(msgs, list(TOOLS))
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "duel", "arguments": {"with": "Tybalt"}}\n</tool_call>'
    assert out[3] == msgs[2]


def test_odd_shapes_are_400s_or_ignored_not_errors() -> None:
    from server.errors import APIError

    req = P.ChatCompletionRequest(messages=[P.ChatMessage(role="user", content="hi")], tools=list(TOOLS),
                                  tool_choice={"type": "function", "function": "duel"})
    with pytest.raises(APIError) as e:
        T.plan(req, None)
    assert e.value.param == "tool_choice"
    odd = [{"role": "assistant", "content": "x", "tool_calls": 5},
           {"role": "assistant", "content": "", "tool_calls": ["a", {"function": "f"}]}]
    out = T.for_plain_template(odd, None)
    assert out[0] == odd[0] and "<tool_call>" in out[1]["content"]


def test_auto_tool_choice_flag_needs_a_parser() -> None:
    from server.args import ServerArgs

    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerArgs(enable_auto_tool_choice=True).validate()
    assert ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes").validate().tool_call_parser == "hermes"
