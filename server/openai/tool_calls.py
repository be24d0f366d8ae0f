"""Tool calling on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` -> what the model sees
and may write, and its output -> `message.tool_calls`.

- `required` and a named function are enforced by a grammar (engine structured outputs), as vLLM does: a named
  call's output is its arguments object (the function's `parameters` schema); `required` is a JSON array of
  {"name", "parameters"} objects, one of the tools each (one item when parallel_tool_calls is false). Their
  arguments always parse and match the schema.
- `auto` needs `--enable-auto-tool-choice --tool-call-parser hermes`: the model writes
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes; a JSON list of calls inside one
  block, SmolLM2-Instruct's habit, is read too), which are parsed out of its text; text outside them is content.
- A chat template that knows nothing of tools gets them the Hermes way: a system message listing them, and
  earlier assistant tool calls written back as `<tool_call>` blocks.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.structured import StructuredOutputsParams
from server import protocol as P
from server.errors import APIError

PARSERS = ("hermes",)
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.DOTALL)
MAX_TOOLS = 128


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools. mode: none | auto | required | named."""

    mode: str
    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, as sent (validated)
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def functions(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def spec(self) -> StructuredOutputsParams | None:
        """The grammar that enforces `required` or a named function; None for auto / none."""
        fns = self.functions
        if self.mode == "named":
            return StructuredOutputsParams(json=_parameters(fns[self.name]))  # type: ignore[index]
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]},
                                                       "parameters": _parameters(f)},
                      "required": ["name", "parameters"], "additionalProperties": False} for n, f in fns.items()]
            schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                      "items": items[0] if len(items) == 1 else {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        return None

    def template_tools(self) -> list[dict[str, Any]] | None:
        return list(self.tools) if self.mode != "none" and self.tools else None


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def plan(req: P.ChatCompletionRequest, auto_parser: str | None) -> ToolPlan | None:
    """Validate the request's tool fields (400 naming the field); None when it has no tools."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if len(req.tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools are allowed, got {len(req.tools)}", param="tools")
    for k, t in enumerate(req.tools):
        fn = t.get("function")
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {...}}", param=f"tools.{k}")
        if not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
            raise APIError(400, "a function name must be 1-64 letters, digits, '_', '.' or '-'",
                           param=f"tools.{k}.function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, "function parameters must be a JSON schema object",
                           param=f"tools.{k}.function.parameters")
    tools = tuple(req.tools)
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if auto_parser is None:
            raise APIError(400, "tool_choice 'auto' (the default with tools) needs the server started with "
                                "--enable-auto-tool-choice --tool-call-parser hermes; or set tool_choice to "
                                "'required', 'none' or a named function", param="tool_choice")
        return ToolPlan("auto", tools, parallel=parallel)
    if choice in ("none", "required"):
        return ToolPlan(choice, tools, parallel=parallel)  # type: ignore[arg-type]
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) and choice.get("type", "function") == "function" else None
        if not isinstance(name, str):
            raise APIError(400, "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param="tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return ToolPlan("named", tools, name=name, parallel=parallel)
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice")


# ---- prompts -------------------------------------------------------------------------------------------


def hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            f"query. The functions you can call are listed within <tools></tools> tags:\n<tools>\n{listed}\n"
            "</tools>\nFor each function call, return a JSON object with the function name and arguments within "
            '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
            "\n</tool_call>")


def for_plain_template(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages for a chat template that has no tool support: the tools in a system message (Hermes style),
    assistant tool calls written into its content as <tool_call> blocks."""
    out = []
    for m in msgs:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and isinstance(calls, list) and calls:
            blocks = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                fn = fn if isinstance(fn, dict) else {}
                args = fn.get("arguments", "{}")
                with contextlib.suppress(ValueError):
                    args = json.loads(args) if isinstance(args, str) else args
                blocks.append(f"{TOOL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args})}\n{TOOL_CLOSE}")
            m = {**m, "content": "\n".join(filter(None, [m.get("content") or "", *blocks]))}
        out.append(m)
    if tools:
        prompt = hermes_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---- outputs -------------------------------------------------------------------------------------------


def _calls_from_objects(objs: Any, args_key: str) -> list[P.ToolCall] | None:
    if isinstance(objs, dict):
        objs = [objs]
    if not isinstance(objs, list) or not objs:
        return None
    calls = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            return None
        args = o.get(args_key, o.get("arguments", o.get("parameters", {})))
        calls.append(P.ToolCall(id=call_id(), function=P.FunctionCall(
            name=o["name"], arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))))
    return calls


def parse_output(tp: ToolPlan, text: str) -> tuple[str | None, list[P.ToolCall]]:
    """(content, tool calls) of a finished output; text that does not parse stays content."""
    if tp.mode == "named":
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        if ok:
            return None, [P.ToolCall(id=call_id(), function=P.FunctionCall(name=tp.name, arguments=text))]
        return text, []
    if tp.mode == "required":
        try:
            calls = _calls_from_objects(json.loads(text), "parameters")
        except ValueError:
            calls = None
        return (None, calls) if calls else (text, [])
    if tp.mode == "auto":
        return parse_hermes(text)
    return text, []


def parse_hermes(text: str) -> tuple[str | None, list[P.ToolCall]]:
    """Hermes `<tool_call>{json}</tool_call>` blocks (an unclosed last block is read to the end)."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        return text, []
    calls: list[P.ToolCall] = []
    body = text[start:]
    if TOOL_CLOSE not in body[body.rfind(TOOL_OPEN):]:
        body += TOOL_CLOSE  # the model stopped (EOS) before closing its last call
    for m in _BLOCK.finditer(body):
        try:
            got = _calls_from_objects(json.loads(m.group(1).strip()), "arguments")
        except ValueError:
            got = None
        if got is None:
            return text, []  # not a well-formed call: leave the text alone
        calls += got
    content = text[:start].strip()
    return content or None, calls


@dataclass
class ToolStream:
    """One streamed choice's tool-call state: content deltas pass through until a call starts; then the text
    is held and each call goes out as one delta (id, name, whole arguments), OpenAI's chunk shape. A named
    function streams its arguments as they come."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of `text` already sent as content (auto) or arguments (named)
    calls_sent: int = 0
    blocks_done: int = 0  # auto: closed <tool_call> blocks already sent
    named_id: str = field(default_factory=call_id)

    def feed(self, delta: str, final: bool) -> tuple[str | None, list[P.ToolCall]]:
        """(content delta, tool-call deltas) for a new piece of text."""
        self.text += delta
        mode = self.plan.mode
        if mode == "named":
            out = []
            if self.calls_sent == 0:
                out.append(P.ToolCall(index=0, id=self.named_id, function=P.FunctionCall(name=self.plan.name,
                                                                                          arguments="")))
                self.calls_sent = 1
            if len(self.text) > self.sent:
                out.append(P.ToolCall(index=0, id=None, type=None,
                                      function=P.FunctionCall(arguments=self.text[self.sent:])))
                self.sent = len(self.text)
            return None, out
        if mode == "required":
            if not final:
                return None, []
            content, calls = parse_output(self.plan, self.text)
            return content, self._indexed(calls)
        if mode != "auto":
            return delta or None, []
        return self._auto(final)

    def _indexed(self, calls: list[P.ToolCall]) -> list[P.ToolCall]:
        out = []
        for c in calls:
            out.append(c.model_copy(update={"index": self.calls_sent}))
            self.calls_sent += 1
        return out

    def _auto(self, final: bool) -> tuple[str | None, list[P.ToolCall]]:
        start = self.text.find(TOOL_OPEN)
        if start < 0:  # content, except a tail that may be the start of "<tool_call>"
            keep = 0 if final else _partial_suffix(self.text, TOOL_OPEN)
            return self._content(len(self.text) - keep), []
        content = self._content(start)
        calls: list[P.ToolCall] = []
        if final:
            _, parsed = parse_hermes(self.text[start:])
            if parsed:
                calls = self._indexed(parsed[self.calls_sent:])
            elif self.calls_sent == 0:  # no well-formed call after all: it was content
                content = (content or "") + self.text[self.sent:]
                self.sent = len(self.text)
            return content or None, calls
        closed = self.text.count(TOOL_CLOSE, start)
        if closed > self.blocks_done:
            end = self.text.rfind(TOOL_CLOSE) + len(TOOL_CLOSE)
            _, parsed = parse_hermes(self.text[start:end])
            if parsed:  # a malformed block waits for the end, where the text decides
                self.blocks_done = closed
                calls = self._indexed(parsed[self.calls_sent:])
        return content, calls

    def _content(self, upto: int) -> str | None:
        if upto <= self.sent:
            return None
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
