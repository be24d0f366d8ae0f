"""Errors in OpenAI's shape: APIError, what each failure maps to, and the app's exception handlers.

Every client mistake becomes a 4xx `{"error": {message, type, param, code}}`, never a 422 or a 500; error
bodies never carry a traceback or a server file path (`scrub`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import EngineDeadError, QueueFullError, RequestTimeoutError
from engine.errors import InvalidParameterError
from server import protocol as P

logger = logging.getLogger("depthserve.server")

RETRY_AFTER_S = 1

# An absolute file path (POSIX or Windows) inside an exception's text: the server's layout is not the
# client's business. URLs survive (their slashes follow ':' or '/').
_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?[/\\](?:[\w.~-]+[/\\])+[\w.~-]*")


def scrub(message: str, limit: int = 500) -> str:
    """A message quoting an exception, safe to show a client: paths replaced, length capped."""
    message = _PATH.sub("<path>", message)
    return message if len(message) <= limit else message[:limit] + "..."


class APIError(Exception):
    """An error for the client, rendered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> bytes:
        info = P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump_json().encode()

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type="application/json", headers=self.headers)


# ---- what each failure is for the client ------------------------------------------------------------


def queue_full(e: QueueFullError) -> APIError:
    return APIError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def engine_dead(e: EngineDeadError) -> APIError:
    """503; EngineDeadError's messages are written for clients (the cause is in the server log)."""
    return APIError(503, scrub(str(e)), "service_unavailable_error", code="engine_unavailable")


def engine_error(message: str) -> APIError:
    """A request failed inside a model step (the engine goes on serving others): 500, no details."""
    return APIError(500, scrub(message), "internal_error", code="engine_error")


def timed_out(timeout: float | None) -> APIError:
    return APIError(504, f"the request did not finish within the server's request timeout of {timeout:g} s "
                         "and was aborted", "timeout_error", code="request_timeout")


def internal_error() -> APIError:
    return APIError(500, "internal server error", "internal_error")


def _param_of(message: str, fields: Sequence[str]) -> str | None:
    """Fallback for a plain ValueError: guess the field from its message's first word ('top_p must ...')."""
    m = re.match(r"[a-z_]+", message)
    return m.group(0) if m is not None and m.group(0) in fields else None


def invalid_parameter(e: ValueError | TypeError, fields: Sequence[str], prompt_field: str,
                      aliases: Mapping[str, str] | None = None) -> APIError:
    """400 for a request the engine (or SamplingParams) refused, naming the request field it blames.

    InvalidParameterError names its parameter; the prompt ("prompt", "prompt_token_ids") is the endpoint's
    `prompt_field`, and `aliases` maps other engine names to this endpoint's (chat: logprobs ->
    top_logprobs). A plain ValueError (engine code not yet converted) falls back to its message's first word.
    """
    message = str(e)
    name = e.param if isinstance(e, InvalidParameterError) else _param_of(message, [*fields, "prompt",
                                                                                      "prompt_token_ids"])
    if name in ("prompt", "prompt_token_ids"):
        return APIError(400, message, param=prompt_field)
    name = (aliases or {}).get(name, name) if name is not None else None
    return APIError(400, message, param=name if name in fields else None)


# ---- pydantic / FastAPI validation errors -----------------------------------------------------------

_UNION_TAG = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)")


def _loc(err: Any) -> list[str]:
    return [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]


def validation_error(errors: Sequence[Any]) -> APIError:
    """First pydantic/FastAPI error -> 400 naming the field ('max_tokens: Input should be ...')."""
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    loc = _loc(e)
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "model_type" and not loc:
        return APIError(400, "request body must be a JSON object")
    # pydantic tags union members in the path ('prompt', 'list[int]', 0): keep the field path, and
    # say which shapes a union field accepts instead of reporting one member's complaint
    param = ".".join(x for x in loc if not _UNION_TAG.fullmatch(x)) or None
    msg = e.get("msg", "invalid value")
    at = next((i for i, x in enumerate(loc) if _UNION_TAG.fullmatch(x)), None)
    if e.get("type") == "extra_forbidden":
        msg = "unrecognized request argument"
    elif at is not None:
        prefix = loc[:at]
        same = [err for err in errors if _loc(err)[:at] == prefix and len(_loc(err)) > at]
        shapes = list(dict.fromkeys(_loc(err)[at] for err in same if _UNION_TAG.fullmatch(_loc(err)[at])))
        if len(shapes) > 1:
            param = ".".join(prefix)
            msg = "Input should be one of: " + ", ".join(shapes)
            errors = same[:1] + [err for err in errors if err not in same]
    extra = f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{extra}" if param else f"{msg}{extra}", param=param)


# ---- the app's exception handlers -------------------------------------------------------------------


def install_handlers(app: FastAPI, request_timeout: float | None) -> None:
    """Map every exception a route can raise to its OpenAI-shaped response (unknown ones: a logged 500)."""

    def handle(kind: type[Exception], to_error: Callable[[Any], APIError]) -> None:
        async def handler(request: Request, exc: Exception) -> Response:
            return to_error(exc).response()

        app.add_exception_handler(kind, handler)

    def http_error(exc: StarletteHTTPException) -> APIError:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind)

    handle(APIError, lambda exc: exc)
    handle(RequestValidationError, lambda exc: validation_error(exc.errors()))
    handle(StarletteHTTPException, http_error)
    handle(QueueFullError, queue_full)
    handle(EngineDeadError, engine_dead)
    handle(RequestTimeoutError, lambda exc: timed_out(request_timeout))

    async def internal(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error().response()

    app.add_exception_handler(Exception, internal)
