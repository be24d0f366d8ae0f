"""Structured-output request fields -> one StructuredOutputsParams, and the request field it came from.

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
"schema", "strict"}}), vLLM's `structured_outputs` ({json | regex | choice | grammar | json_object}) and its
older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. At most one of them may constrain a
request; shape errors are a 400 naming the field here, and the engine's compile errors (an invalid schema,
regex or grammar, one too large or too slow to compile) are mapped back to the same field by `aliases`.
"""

from __future__ import annotations

from typing import Any

from engine.structured import KINDS, StructuredOutputsParams
from server import protocol as P
from server.errors import APIError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _bad(field: str, message: str) -> APIError:
    return APIError(400, message, param=field)


def _response_format(rf: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise _bad("response_format", f"response_format type must be 'text', 'json_object' or 'json_schema', "
                                      f"got {kind!r}")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name", ""), str):
        raise _bad("response_format", "response_format json_schema must be an object with 'name' and 'schema'")
    schema = js.get("schema", {"type": "object"})  # OpenAI: a missing schema means any object
    if not isinstance(schema, dict):
        raise _bad("response_format", "response_format json_schema.schema must be a JSON schema object")
    return StructuredOutputsParams(json=schema)


def spec_of(req: P._SamplingRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field that set it; a 400 when more than one field sets one or a
    field's shape is wrong (a compile error comes later, from the engine, mapped by `aliases`)."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append((spec, "response_format"))
    so = getattr(req, "structured_outputs", None)
    if so is not None:
        fields = {k: v for k, v in so.items() if v is not None and v is not False}
        unknown = sorted(set(fields) - set(KINDS))
        if unknown:
            raise _bad("structured_outputs", f"structured_outputs has unknown field(s) {unknown}; it takes one of "
                                             f"{', '.join(KINDS)}")
        if fields:
            found.append((_params(fields, "structured_outputs"), "structured_outputs"))
    for name, kind in GUIDED.items():
        v = getattr(req, name, None)
        if v is not None:
            found.append((_params({kind: v}, name), name))
    if len(found) > 1:
        raise _bad(found[1][1], f"give one structured-output constraint; got {', '.join(f for _, f in found)}")
    return found[0] if found else (None, None)


def _params(fields: dict[str, Any], field: str) -> StructuredOutputsParams:
    kind = next(iter(fields))
    v = fields[kind]
    if kind == "choice" and (not isinstance(v, list) or not all(isinstance(c, str) for c in v)):
        raise _bad(field, f"{field}: choice must be a list of strings")
    if kind in ("regex", "grammar") and not isinstance(v, str):
        raise _bad(field, f"{field}: {kind} must be a string")
    if kind == "json" and not isinstance(v, dict | str):
        raise _bad(field, f"{field}: json must be a JSON schema (an object, or its JSON text)")
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        raise _bad(field, str(e)) from None


def aliases(field: str | None) -> dict[str, str]:
    """Engine parameter names (a spec's kind) -> the request field, for errors the engine raises."""
    if field is None:
        return {}
    return {k: field for k in (*KINDS, "structured_outputs")}
