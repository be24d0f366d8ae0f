"""The FastAPI app: routes, middleware, lifespan, /health and /metrics.

What each route does lives in server/openai (serving_engine: the generation pipeline shared by
completions and chat; serving_completion, serving_chat, serving_tokenization: per endpoint; routing: the
API key and how JSON bodies are read; engine_outputs: the only reader of engine outputs); errors in
OpenAI's shape and the exception -> status mapping live in server/errors.py. Request bodies are pydantic
models declared on the routes, so the OpenAPI document (served at /openapi.json, behind the API key)
describes them as FastAPI generates it. CORS is off unless origins are configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import PlainTextResponse, Response

from engine.async_engine import AsyncLLMEngine
from server import protocol as P
from server.errors import APIError, install_handlers
from server.metrics import ServerMetrics
from server.middleware import HostGuard
from server.openai.routing import ApiKey, json_body_route
from server.openai.serving_models import ModelRouter
from server.stat_logger import StatLogger

logger = logging.getLogger("depthserve.server")


def _version() -> str:
    try:
        return metadata.version("depthserve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.1.0"


VERSION = _version()

_ERROR = {"model": P.ErrorResponse}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request"},
    404: {**_ERROR, "description": "Unknown model"},
    408: {**_ERROR, "description": "The body did not arrive in time"},
    413: {**_ERROR, "description": "Body too large"},
    415: {**_ERROR, "description": "Body is not JSON"},
    "4XX": {**_ERROR, "description": "Any other client error"},  # also keeps FastAPI's 422 out: it is a 400 here
    500: {**_ERROR, "description": "Internal error"},
}
_GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    429: {**_ERROR, "description": "Queue full: retry after the Retry-After header's seconds"},
    500: {**_ERROR, "description": "A model step failed for this request"},
    503: {**_ERROR, "description": "The engine has stopped"},
    504: {**_ERROR, "description": "Not finished within the server's request timeout"},
}
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {**_ERROR, "description": "Missing or wrong API key"}}
# one server-sent event: `data` is a JSON chunk, an error object, or [DONE]
_SSE = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                         "properties": {"data": {"type": "string"}}}}}


def _cache_info(engine: AsyncLLMEngine) -> dict[str, object] | None:
    """cache_config_info's labels: vLLM's names (num_gpu_blocks is the KV block count, on CPU too), plus the
    depth pool's size in tokens per step."""
    eng = engine.engine
    cfg, kv = getattr(eng, "config", None), getattr(eng, "kv", None)
    if cfg is None or kv is None:
        return None
    depth = getattr(eng, "depth", None)
    return {"block_size": cfg.cache.block_size, "cache_dtype": str(cfg.dtype).removeprefix("torch."),
            "enable_prefix_caching": cfg.cache.enable_prefix_caching,
            "gpu_memory_utilization": cfg.cache.gpu_memory_utilization, "num_gpu_blocks": kv.num_blocks,
            "depth_pool_tokens": depth.capacity if depth is not None else 0}


def build_app(engine: AsyncLLMEngine | Mapping[str, AsyncLLMEngine], served_model_names: Sequence[str] = (),
              api_key: str | None = None,
              max_body_bytes: int = 8 << 20, metrics_require_auth: bool = False,
              request_timeout: float | None = None, allowed_origins: Sequence[str] = (),
              allowed_hosts: Sequence[str] | None = None, log_stats_interval: float | None = None,
              enable_docs: bool = False, tool_call_parser: str | None = None) -> FastAPI:
    """The HTTP app around (unstarted) AsyncLLMEngines; its lifespan starts and stops them.

    `engine`: one engine answering to every name in `served_model_names`, or {served name: engine} for
    several models (server.openai.serving_models routes by the request's `model`; `served_model_names`
    is then unused). Metrics carry each model's name in their `model_name` label.

    `request_timeout` (seconds, from arrival): a generation still running then is aborted (504 or a
    stream error event). `allowed_origins`: browser origins allowed by CORS ("*" for any); empty: none.
    `allowed_hosts`: Host header patterns served (server.middleware.HostGuard), others get 400; None: any.
    `log_stats_interval`: seconds between stats log lines while busy (None: none). `enable_docs`: Swagger UI
    at /docs. `tool_call_parser`: the format tool_choice "auto" parses (--enable-auto-tool-choice); None: "auto"
    is refused.
    """
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if isinstance(engine, AsyncLLMEngine):
        router = ModelRouter([(engine, served_model_names)], request_timeout, tool_call_parser)
    else:
        router = ModelRouter([(e, [n]) for n, e in engine.items()], request_timeout, tool_call_parser)
    engines = router.engines
    key = ApiKey(api_key) if api_key else None
    first = engines[0]
    # one registry: the request-token buckets reach the longest max_model_len of the models
    metrics = ServerMetrics(lambda: first.stats, router.served[0].names[0],
                            max_model_len=max(e.max_model_len for e in engines), cache_info=_cache_info(first))
    first.observer = metrics
    for s in router.served[1:]:
        s.engine.observer = metrics.add_model(lambda e=s.engine: e.stats, s.names[0], cache_info=_cache_info(s.engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for e in engines:
            if not e.started:
                e.start()
        # one stats line per model and interval; with several models each line starts with the model's name
        stat_tasks = [asyncio.create_task(StatLogger(lambda e=s.engine: e.stats, log_stats_interval,
                                                     prefix=f"{s.names[0]}: " if len(engines) > 1 else "").run())
                      for s in router.served] if log_stats_interval else []
        try:
            yield
        finally:
            for t in stat_tasks:
                t.cancel()
            await asyncio.gather(*(asyncio.to_thread(e.shutdown) for e in engines))
            if len(engines) == 1:
                logger.info("engine stopped")
            else:
                logger.info("%d engines stopped", len(engines))

    # no slash redirects: their absolute Location would echo the client's Host header
    app = FastAPI(title="depthserve", version=VERSION, description="OpenAI-compatible API of a depthserve server.",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)
    if allowed_hosts is not None:  # added last: the outermost, before CORS and routing
        app.add_middleware(HostGuard, patterns=list(allowed_hosts))
    app.state.models = router
    app.state.metrics = metrics
    app.state.engine = first
    app.state.engines = engines
    install_handlers(app, request_timeout)

    auth = [Depends(key)] if key is not None else []
    unauthorized = _UNAUTHORIZED if key is not None else {}
    body_route = json_body_route(max_body_bytes, request_timeout, key)
    route: Callable[..., Any]
    for path, route, ok, errors in (
            ("/v1/completions", router.create_completion, P.CompletionResponse, _GENERATE_ERRORS),
            ("/v1/chat/completions", router.create_chat_completion, P.ChatCompletionResponse, _GENERATE_ERRORS),
            ("/tokenize", router.tokenize, P.TokenizeResponse, _BODY_ERRORS),
            ("/detokenize", router.detokenize, P.DetokenizeResponse, _BODY_ERRORS)):
        streams = errors is _GENERATE_ERRORS
        app.router.add_api_route(path, route, methods=["POST"], dependencies=auth, route_class_override=body_route,
                                 responses={
            200: {"model": ok, "description": "OK" + (" (text/event-stream when stream is true)" if streams else ""),
                  **({"content": _SSE} if streams else {})}, **errors, **unauthorized})
    app.add_api_route("/v1/models", router.list, methods=["GET"], dependencies=auth,
                      responses={200: {"model": P.ModelList, "description": "Served models"}, **unauthorized})
    app.add_api_route("/tokenizer_info", router.tokenizer_info, methods=["GET"], dependencies=auth,
                      responses={200: {"model": P.TokenizerInfoResponse, "description": "The model's tokenizer"},
                                 **_BODY_ERRORS, **unauthorized})

    async def openapi_json() -> Response:
        return Response(json.dumps(app.openapi()), media_type="application/json")

    app.add_api_route("/openapi.json", openapi_json, methods=["GET"], dependencies=auth, include_in_schema=False)

    @app.get("/health", responses={
        200: {"description": "The engine is serving", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}}}},
        503: {**_ERROR, "description": "The engine has stopped"}})
    async def health() -> Response:
        down = next((s for s in router.served if not s.engine.is_healthy), None)
        if down is None:
            return Response(b'{"status":"ok"}', media_type="application/json")
        reason = down.engine.unavailable_reason or "the engine is not running"  # no internals: they are logged
        if len(engines) > 1:
            reason = f"model {down.names[0]}: {reason}"
        return APIError(503, reason, "service_unavailable_error", code="engine_unavailable").response()

    async def ping() -> Response:
        return await health()

    for method in ("GET", "POST"):  # one route per method: each needs its own OpenAPI operation id
        app.add_api_route("/ping", ping, methods=[method], operation_id=f"ping_{method.lower()}", responses={
            200: {"description": "The engine is serving (as /health; vLLM's and SageMaker's probe)"},
            503: {**_ERROR, "description": "The engine has stopped"}})

    @app.get("/version", responses={200: {"description": "The server's version", "content": {
        "application/json": {"schema": {"type": "object", "properties": {"version": {"type": "string"}},
                                        "required": ["version"]}}}}})
    async def version() -> Response:
        return Response(json.dumps({"version": VERSION}), media_type="application/json")

    if enable_docs:
        async def docs() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="depthserve API")

        app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)

    @app.get("/metrics", dependencies=auth if metrics_require_auth else [], response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **(unauthorized if metrics_require_auth else {})})
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
