"""How a request reaches a handler: the API key, and JSON bodies checked before FastAPI parses them.

FastAPI validates a route's body model itself (so the OpenAPI document describes it), but it would read
any body, of any size, however slowly. `json_body_route` gives routes a handler that first checks the API
key, then reads the body under this server's rules, and only then lets FastAPI parse and validate it:

- the declared type must be JSON: browsers cannot send that cross-site without a CORS preflight, so a page
  cannot make a visitor's browser spend this server's compute; a body with no type is refused too (that
  is what fetch(..., {mode: "no-cors"}) sends) -> 415;
- at most `max_body_bytes`, counted while reading (no Content-Length needed) -> 413;
- complete within BODY_TIMEOUT_S, or the request timeout if sooner: slow uploads cannot pin handlers -> 408;
- a client gone before sending it -> 499.

The body is parsed with pydantic's JSON parser (the one `model_validate_json` uses: invalid UTF-8, lone
surrogates and absurd nesting are JSON errors), so FastAPI only validates the parsed value; its
RequestValidationError becomes a 400 naming the field (server.errors.validation_error).
The request's deadline (arrival + request timeout) is left in `request.state.deadline`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic_core import from_json
from starlette.requests import ClientDisconnect

from server.errors import APIError, scrub

BODY_TIMEOUT_S = 60.0
JSON_TYPES = ("application/json",)

# Only declares the scheme, so that FastAPI documents it on protected routes; ApiKey does the checking.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer")


class ApiKey:
    """The API key check: a FastAPI dependency, and a plain check for routes that run it earlier."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    def check(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="depthserve"'})  # RFC 6750

    async def __call__(self, request: Request, _: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> None:
        self.check(request)


async def read_json_body(request: Request, limit: int, deadline: float | None) -> bytes:
    """The body, if its declared type is JSON and it fits `limit` bytes and arrives in time."""
    ctype = request.headers.get("content-type")
    if ctype is None:
        raise APIError(415, "missing Content-Type: send JSON with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    media = ctype.partition(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise APIError(415, f"unsupported Content-Type {scrub(media, 80)!r}: send JSON with "
                            "'Content-Type: application/json'", code="unsupported_media_type")
    too_big = APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    wait = BODY_TIMEOUT_S if deadline is None else min(BODY_TIMEOUT_S, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(read(), max(wait, 0.0))
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {wait:.0f} s",
                       code="request_timeout") from None
    except ClientDisconnect:  # gone before sending its body: an ordinary event, not a server error
        raise APIError(499, "client closed the request", code="client_closed_request") from None


def json_body_route(max_body_bytes: int, request_timeout: float | None, api_key: ApiKey | None) -> type[APIRoute]:
    """An APIRoute class whose handler runs the checks above before FastAPI reads the body."""

    class JSONBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            parse_and_handle = super().get_route_handler()

            async def handler(request: Request) -> Response:
                request.state.deadline = None if request_timeout is None else time.monotonic() + request_timeout
                if api_key is not None:  # before reading: a client without the key costs no body read
                    api_key.check(request)
                body = await read_json_body(request, max_body_bytes, request.state.deadline) or b"{}"
                try:
                    parsed = from_json(body)
                except ValueError as e:
                    raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": str(e),
                                                   "ctx": {"error": str(e)}}]) from None
                # what FastAPI reads next (Request caches both): no second read, no second parse
                request._body, request._json = body, parsed
                return await parse_and_handle(request)

            return handler

    return JSONBodyRoute
