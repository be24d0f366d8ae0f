"""FastAPI app: OpenAI routes, SSE streaming, errors in OpenAI's shape, auth, /metrics, /health.

Bodies are read by hand (JSON content type only, size- and time-capped, then validated with the protocol
models) so that every client mistake becomes a 4xx in `{"error": {...}}` form and never a 422 or a 500.
Every request handed to the engine is aborted in a `finally` if it has not finished: a client that
disconnects (streaming or not), or a request past `request_timeout`, frees its KV blocks within a step.
Error bodies never carry a traceback or a server file path (`_scrub`); CORS is off unless origins are
configured. The OpenAPI schema (with the request bodies) is served at /openapi.json, behind the API key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestGroup,
    RequestTimeoutError,
)
from engine.outputs import Logprob, RequestOutput
from engine.request import Request as EngineRequest
from engine.sampling_params import SamplingParams, seed_for_sample
from server import protocol as P
from server.metrics import ServerMetrics
from server.middleware import HostGuard

logger = logging.getLogger("depthserve.server")

M = TypeVar("M", bound=BaseModel)

MAX_CHOICES = 256  # prompts x n in one request: more would flood the queue from a single call
RETRY_AFTER_S = 1
BODY_TIMEOUT_S = 60.0  # a body must arrive within this (or request_timeout): slow uploads cannot pin handlers
JSON_TYPES = ("application/json",)

# An absolute file path (POSIX or Windows) inside an exception's text: the server's layout is not the
# client's business. URLs survive (their slashes follow ':' or '/').
_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?[/\\](?:[\w.~-]+[/\\])+[\w.~-]*")


def _scrub(message: str, limit: int = 500) -> str:
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


def _queue_full(e: QueueFullError) -> APIError:
    return APIError(429, f"the server is busy: {e}", "rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _dead(e: EngineDeadError) -> APIError:
    """503; EngineDeadError's messages are written for clients (the cause is in the server log)."""
    return APIError(503, _scrub(str(e)), "service_unavailable_error", code="engine_unavailable")


def _engine_error(message: str) -> APIError:
    """A request failed inside a model step (the engine goes on serving others): 500, no details."""
    return APIError(500, _scrub(message), "internal_error", code="engine_error")


def _timed_out(timeout: float | None) -> APIError:
    return APIError(504, f"the request did not finish within the server's request timeout of {timeout:g} s "
                         "and was aborted", "timeout_error", code="request_timeout")


def _json(model: BaseModel, status: int = 200, **dump: Any) -> Response:
    return Response(model.model_dump_json(**dump), status_code=status, media_type="application/json")


def _sse(model: BaseModel, **dump: Any) -> str:
    return f"data: {model.model_dump_json(**dump)}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


def _param_of(message: str, fields: Sequence[str], prompt_field: str) -> str | None:
    """Guess the offending field from an engine/SamplingParams message ('top_p must be ...')."""
    m = re.match(r"[a-z_]+", message)
    if m is None:
        return None
    name = m.group(0)
    if name in ("prompt", "prompt_token_ids"):
        return prompt_field
    return name if name in fields else None


class _EngineStream(StreamingResponse):
    """SSE response that aborts its engine requests however the response ends (even unstarted)."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._group = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.abort()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, group: RequestGroup, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler's wait; if the client goes away first, abort its requests."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        return Response(status_code=499)  # nobody is listening; this only ends the handler
    finally:
        task.cancel()
        watch.cancel()
        group.abort()


@dataclass
class _Choice:
    """What a handler needs about one engine request of its group."""

    index: int
    prompt_index: int
    prompt_text: str
    num_prompt_tokens: int
    text_offset: int = 0
    final: RequestOutput | None = None
    started: bool = False  # chat: role chunk sent


@dataclass
class _Job:
    id: str
    model: str
    group: RequestGroup
    choices: dict[str, _Choice]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> P.UsageInfo:
        prompt = {c.prompt_index: c.num_prompt_tokens for c in self.choices.values()}
        completion = sum(len(c.final.outputs[0].token_ids) for c in self.choices.values() if c.final)
        total_prompt = sum(prompt.values())
        return P.UsageInfo(prompt_tokens=total_prompt, completion_tokens=completion,
                           total_tokens=total_prompt + completion)


def _depth(out: RequestOutput, echo: bool, generated: list | None) -> list | None:
    """Depth weights of a choice: one entry per forward pass, in token order.

    Without echo: one per generated token (the pass that produced it). With echo: one per prompt
    token (the pass over it; the last one produced the first generated token), then one per later
    generated token.
    """
    if generated is None:
        return None
    if echo and out.prompt_depth_attention is not None:
        return out.prompt_depth_attention + generated[1:]
    return generated


class OpenAIServer:
    """Routes and their shared state; one per app (no module-global state)."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], api_key: str | None,
                 max_body_bytes: int, request_timeout: float | None = None) -> None:
        if not served_model_names:
            raise ValueError("at least one served model name is needed")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        self.engine = engine
        self.names = list(served_model_names)
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)

    # ---- request plumbing --------------------------------------------------------------------------
    async def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    def deadline(self) -> float | None:
        """When a request arriving now must be done by (time.monotonic()), if there is a timeout."""
        return None if self.request_timeout is None else time.monotonic() + self.request_timeout

    async def read_body(self, request: Request, deadline: float | None = None) -> bytes:
        """The body, if its declared type is JSON (browsers cannot send that cross-site without a CORS
        preflight, so a page cannot make a visitor's browser spend this server's compute; a body with no
        type is refused for the same reason) and it fits the size limit and arrives in time."""
        ctype = request.headers.get("content-type")
        if ctype is None:  # what fetch(..., {mode: "no-cors"}) sends: no preflight, so refuse it too
            raise APIError(415, "missing Content-Type: send JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")
        media = ctype.partition(";")[0].strip().lower()
        if media not in JSON_TYPES and not media.endswith("+json"):
            raise APIError(415, f"unsupported Content-Type {_scrub(media, 80)!r}: send JSON with "
                                "'Content-Type: application/json'", code="unsupported_media_type")
        limit = self.max_body_bytes
        too_big = APIError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
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

    async def parse(self, request: Request, model: type[M], deadline: float | None = None) -> M:
        body = await self.read_body(request, deadline)
        try:
            return model.model_validate_json(body or b"{}")
        except ValidationError as e:
            raise _validation_error(e.errors()) from None

    def check_model(self, name: str | None) -> str:
        """The served name a request asked for: only ever matched against served names, never a path."""
        if name is None or name in self.names:
            return name or self.names[0]
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise APIError(404, f"The model `{shown}` does not exist. Served: {', '.join(self.names)}",
                       "not_found_error", param="model", code="model_not_found")

    def make(self, prompt: str | list[int], params: SamplingParams, rid: str, fields: Sequence[str],
             prompt_field: str) -> EngineRequest:
        try:
            return self.engine.make_request(prompt, params, rid)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=_param_of(str(e), fields, prompt_field)) from None

    def submit(self, reqs: list[EngineRequest], deadline: float | None = None) -> RequestGroup:
        try:
            return self.engine.submit(reqs, deadline)
        except QueueFullError as e:
            raise _queue_full(e) from None
        except EngineDeadError as e:
            raise _dead(e) from None

    def sampling(self, req: P._SamplingRequest, max_tokens: int | None, logprobs: int | None,
                 prompt_field: str) -> SamplingParams:
        bad = req.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0])
        try:
            params = req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), list(type(req).model_fields), prompt_field)) from None
        return params

    def fan_out(self, prompts: list[str | list[int]], params: SamplingParams, rid: str,
                fields: Sequence[str], prompt_field: str) -> tuple[list[EngineRequest], dict[str, _Choice]]:
        """n samples per prompt as separate engine requests (seed+j when seeded), all validated first."""
        if len(prompts) * params.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} exceeds {MAX_CHOICES} choices per request",
                           param="n")
        reqs, choices = [], {}
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                sub = params if params.n == 1 else replace(params, n=1, seed=seed_for_sample(params.seed, j))
                r = self.make(prompt, sub, f"{rid}-{i}-{j}", fields, prompt_field)
                text = prompt if isinstance(prompt, str) else self.decode(r.prompt_token_ids)
                choices[r.request_id] = _Choice(i * params.n + j, i, text, len(r.prompt_token_ids))
                reqs.append(r)
        return reqs, choices

    def chat_requests(self, req: P.ChatCompletionRequest, params: SamplingParams,
                      rid: str) -> tuple[list[EngineRequest], dict[str, _Choice]]:
        """Render the chat template and tokenize (runs on a worker thread, off the event loop)."""
        text = self.render_chat(req.messages, req.add_generation_prompt)
        return self.fan_out([text], params, rid, list(P.ChatCompletionRequest.model_fields), "messages")

    def decode(self, ids: list[int]) -> str:
        tok = self.engine.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def _token_text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """A token as display text (what it adds to the output) and its bytes, for logprobs."""
        tok = self.engine.tokenizer
        if tok is None:
            s = f"token_id:{token_id}"
            return s, tuple(s.encode())
        piece = tok.id_to_token(token_id)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # sentencepiece byte fallback
            b = int(piece[3:5], 16)
            return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), (b,)
        if "\u2581" in piece:  # sentencepiece word boundary
            s = piece.replace("\u2581", " ")
        else:
            s = tok.decode([token_id], skip_special_tokens=False) or piece
        return s, tuple(s.encode())

    def render_chat(self, messages: list[P.ChatMessage], add_generation_prompt: bool) -> str:
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot serve chat: use /v1/completions "
                                "with token ids", param="messages")
        msgs = []
        for k, m in enumerate(messages):
            d = m.model_dump(exclude_none=True)
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text":
                        raise APIError(400, f"only text content parts are supported, got {part.type!r}",
                                       param=f"messages.{k}.content")
                    if part.text is None:
                        raise APIError(400, "a text content part needs a 'text' string",
                                       param=f"messages.{k}.content")
                    texts.append(part.text)
                content = "\n".join(texts)
            d["content"] = content or ""
            if d["role"] == "developer":
                d["role"] = "system"
            msgs.append(d)
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - template errors are caused by the messages sent
            raise APIError(400, f"cannot apply the chat template to these messages: {_scrub(str(e))}",
                           param="messages") from None
        if tok.add_bos and tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]  # encode() adds the BOS id itself
        return text

    # ---- logprobs ----------------------------------------------------------------------------------
    def completion_logprobs(self, lps: Sequence[Logprob], choice: _Choice) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for lp in lps:
            s, _ = self.token_text(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            top = {s: lp.logprob}
            for tid, v in lp.top:
                top.setdefault(self.token_text(tid)[0], v)
            out.top_logprobs.append(top)
            out.text_offset.append(choice.text_offset)
            choice.text_offset += 0 if s.startswith("bytes:") else len(s)
        return out

    def chat_logprobs(self, lps: Sequence[Logprob], k: int) -> P.ChatLogprobs:
        entries = []
        for lp in lps:
            s, b = self.token_text(lp.token_id)
            top = [P.TopLogprob(token=self.token_text(t)[0], logprob=v, bytes=list(self.token_text(t)[1]))
                   for t, v in lp.top[:k]]
            entries.append(P.ChatLogprobEntry(token=s, logprob=lp.logprob, bytes=list(b), top_logprobs=top))
        return P.ChatLogprobs(content=entries)

    # ---- /v1/completions ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        deadline = self.deadline()
        req = await self.parse(request, P.CompletionRequest, deadline)
        model = self.check_model(req.model)
        prompts = _prompts(req.prompt)
        params = self.sampling(req, req.max_tokens, req.logprobs, "prompt")
        fields = list(P.CompletionRequest.model_fields)
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs, choices = await asyncio.to_thread(self.fan_out, prompts, params, rid, fields, "prompt")
        job = _Job(rid, model, self.submit(reqs, deadline), choices, params)
        if req.stream:
            return _EngineStream(self.sse(self.stream_completion(job, req)), job.group)
        return await _unless_disconnected(request, job.group, self.finish_completion(job, req))

    async def finish_completion(self, job: _Job, req: P.CompletionRequest) -> Response:
        await _collect(job)
        choices = []
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            assert c.final is not None
            comp = c.final.outputs[0]
            lp = self.completion_logprobs(comp.logprobs or [], c) if req.logprobs is not None else None
            choices.append(P.CompletionChoice(index=c.index, text=(c.prompt_text if req.echo else "") + comp.text,
                                              logprobs=lp, finish_reason=comp.finish_reason,
                                              stop_reason=comp.stop_reason,
                                              depth_attention=_depth(c.final, req.echo, comp.depth_attention)))
        return _json(P.CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                          usage=job.usage()))

    async def sse(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """End every stream the same way: a failure becomes an SSE error event, then `data: [DONE]`."""
        try:
            async for event in events:
                yield event
        except EngineDeadError as e:
            yield _sse_error(_dead(e))
        except RequestTimeoutError:
            yield _sse_error(_timed_out(self.request_timeout))
        except Exception:  # a bug must end the stream with an error event, not a cut connection
            logger.exception("streaming response failed")
            yield _sse_error(APIError(500, "internal server error", "internal_error"))
        yield _SSE_DONE

    async def stream_completion(self, job: _Job, req: P.CompletionRequest) -> AsyncIterator[str]:
        exclude = None if req.include_usage else {"usage"}

        def chunk(choice: P.CompletionChoice) -> str:
            return _sse(P.CompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                                   choices=[choice]), exclude=exclude)

        if req.echo:
            for c in sorted(job.choices.values(), key=lambda c: c.index):
                yield chunk(P.CompletionChoice(index=c.index, text=c.prompt_text))
        async for out in job.group:
            c = job.choices[out.request_id]
            comp = out.outputs[0]
            if out.error:
                yield _sse_error(_engine_error(out.error))
                break
            lp = None
            if req.logprobs is not None and comp.new_token_ids and comp.logprobs:
                lp = self.completion_logprobs(comp.logprobs[-len(comp.new_token_ids):], c)
            depth = None
            if req.depth_attention and comp.new_token_ids:
                first = len(comp.token_ids) == len(comp.new_token_ids)  # echo: prompt passes come first
                depth = _depth(out, req.echo and first, comp.new_depth_attention)
            if out.finished:
                c.final = out
            elif not comp.new_text and lp is None and depth is None:
                continue
            yield chunk(P.CompletionChoice(index=c.index, text=comp.new_text, logprobs=lp,
                                           finish_reason=comp.finish_reason if out.finished else None,
                                           stop_reason=comp.stop_reason if out.finished else None,
                                           depth_attention=depth))
        else:
            if req.include_usage:
                yield _sse(P.CompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                                      choices=[], usage=job.usage()))

    # ---- /v1/chat/completions ----------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        deadline = self.deadline()
        req = await self.parse(request, P.ChatCompletionRequest, deadline)
        model = self.check_model(req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, req.effective_max_tokens, top, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        reqs, choices = await asyncio.to_thread(self.chat_requests, req, params, rid)
        job = _Job(rid, model, self.submit(reqs, deadline), choices, params)
        if req.stream:
            return _EngineStream(self.sse(self.stream_chat(job, req)), job.group)
        return await _unless_disconnected(request, job.group, self.finish_chat(job, req))

    async def finish_chat(self, job: _Job, req: P.ChatCompletionRequest) -> Response:
        await _collect(job)
        choices = []
        for c in sorted(job.choices.values(), key=lambda c: c.index):
            assert c.final is not None
            comp = c.final.outputs[0]
            lp = self.chat_logprobs(comp.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
            choices.append(P.ChatChoice(index=c.index, message=P.ChatMessageOut(content=comp.text), logprobs=lp,
                                        finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                                        depth_attention=comp.depth_attention))
        return _json(P.ChatCompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                              usage=job.usage()))

    async def stream_chat(self, job: _Job, req: P.ChatCompletionRequest) -> AsyncIterator[str]:
        exclude = None if req.include_usage else {"usage"}

        def chunk(choice: P.ChatStreamChoice) -> str:
            return _sse(P.ChatCompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                                       choices=[choice]), exclude=exclude)

        for c in sorted(job.choices.values(), key=lambda c: c.index):  # the role comes first
            yield chunk(P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(role="assistant", content="")))
        async for out in job.group:
            c = job.choices[out.request_id]
            comp = out.outputs[0]
            if out.error:
                yield _sse_error(_engine_error(out.error))
                break
            lp = None
            if req.logprobs and comp.new_token_ids and comp.logprobs:
                lp = self.chat_logprobs(comp.logprobs[-len(comp.new_token_ids):], req.top_logprobs or 0)
            depth = comp.new_depth_attention if req.depth_attention and comp.new_token_ids else None
            if comp.new_text or lp is not None or depth:
                yield chunk(P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(content=comp.new_text),
                                               logprobs=lp, depth_attention=depth))
            if out.finished:
                c.final = out
                yield chunk(P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(),
                                               finish_reason=comp.finish_reason))
        else:
            if req.include_usage:
                yield _sse(P.ChatCompletionStreamResponse(id=job.id, created=job.created, model=job.model,
                                                          choices=[], usage=job.usage()))

    # ---- small routes ------------------------------------------------------------------------------
    async def models(self) -> Response:
        root = Path(str(self.engine.engine.config.model)).name  # the folder's name, not where it lives
        cards = [P.ModelCard(id=n, root=root, max_model_len=self.engine.max_model_len) for n in self.names]
        return _json(P.ModelList(data=cards))

    async def tokenize(self, request: Request) -> Response:
        req = await self.parse(request, P.TokenizeRequest, self.deadline())
        self.check_model(req.model)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")

        def encode() -> list[int]:  # on a worker thread: a long text must not stall the event loop
            text = req.prompt if req.prompt is not None else self.render_chat(req.messages or [],
                                                                                req.add_generation_prompt)
            return tok.encode(text, add_special_tokens=req.add_special_tokens or req.messages is not None)

        ids = await asyncio.to_thread(encode)
        return _json(P.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids))

    async def detokenize(self, request: Request) -> Response:
        req = await self.parse(request, P.DetokenizeRequest, self.deadline())
        self.check_model(req.model)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        vocab = self.engine.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return _json(P.DetokenizeResponse(prompt=await asyncio.to_thread(tok.decode, req.tokens)))


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    empty = APIError(400, "prompt is empty: give a non-empty string, a list of them, token ids or lists of "
                          "token ids", param="prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise empty
        return [prompt]
    if not prompt:
        raise empty
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    if any(p == "" for p in prompt):
        raise empty
    return list(prompt)  # type: ignore[arg-type]


async def _collect(job: _Job) -> None:
    async for out in job.group:
        if out.error:
            raise _engine_error(out.error)
        if out.finished:
            job.choices[out.request_id].final = out


def _sse_error(err: APIError) -> str:
    return f"data: {err.body().decode()}\n\n"


_UNION_TAG = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)")


def _loc(err: Any) -> list[str]:
    return [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]


def _validation_error(errors: Sequence[Any]) -> APIError:
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


_ERROR = {"model": P.ErrorResponse}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request"},
    404: {**_ERROR, "description": "Unknown model"},
    408: {**_ERROR, "description": "The body did not arrive in time"},
    413: {**_ERROR, "description": "Body too large"},
    415: {**_ERROR, "description": "Body is not JSON"},
    500: {**_ERROR, "description": "Internal error"},
}
_GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    429: {**_ERROR, "description": "Queue full: retry after the Retry-After header's seconds"},
    500: {**_ERROR, "description": "A model step failed for this request"},
    503: {**_ERROR, "description": "The engine has stopped"},
    504: {**_ERROR, "description": "Not finished within the server's request timeout"},
}
# Routes whose JSON body is read by hand, and its schema (FastAPI cannot see it from the signature).
_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": P.CompletionRequest, "/v1/chat/completions": P.ChatCompletionRequest,
    "/tokenize": P.TokenizeRequest, "/detokenize": P.DetokenizeRequest,
}


def _openapi(app: FastAPI, protected: bool) -> dict[str, Any]:
    """The OpenAPI document with the hand-read request bodies (and the bearer scheme when protected)."""
    doc = get_openapi(title="depthserve", version="0.1.0", routes=app.routes,
                      description="OpenAI-compatible API of a depthserve server.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _BODIES.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                                   f"{model.__name__}"}}}}
    if protected:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc["paths"].items():
            if path.startswith("/v1/") or path in _BODIES:
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
                    op.setdefault("responses", {})["401"] = {
                        "description": "Missing or wrong API key",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return doc


def build_app(engine: AsyncLLMEngine, served_model_names: Sequence[str], api_key: str | None = None,
              max_body_bytes: int = 8 << 20, metrics_require_auth: bool = False,
              request_timeout: float | None = None, allowed_origins: Sequence[str] = (),
              allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The HTTP app around an (unstarted) AsyncLLMEngine; its lifespan starts and stops the engine.

    `request_timeout` (seconds, from arrival): a generation still running then is aborted (504 or a
    stream error event). `allowed_origins`: browser origins allowed by CORS ("*" for any); empty: none.
    `allowed_hosts`: Host header patterns served (server.middleware.HostGuard), others get 400; None: any.
    """
    server = OpenAIServer(engine, served_model_names, api_key, max_body_bytes, request_timeout)
    metrics = ServerMetrics(lambda: engine.stats, server.names[0])
    engine.observer = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)
            logger.info("engine stopped")

    # no slash redirects: their absolute Location would echo the client's Host header
    app = FastAPI(title="depthserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)
    if allowed_hosts is not None:  # added last: the outermost, before CORS and routing
        app.add_middleware(HostGuard, patterns=list(allowed_hosts))
    app.state.server = server
    app.state.metrics = metrics
    app.state.engine = engine
    auth = [Depends(server.auth)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(QueueFullError)
    async def _queue_full_error(request: Request, exc: QueueFullError) -> Response:
        return _queue_full(exc).response()

    @app.exception_handler(EngineDeadError)
    async def _dead_error(request: Request, exc: EngineDeadError) -> Response:
        return _dead(exc).response()

    @app.exception_handler(RequestTimeoutError)
    async def _timeout_error(request: Request, exc: RequestTimeoutError) -> Response:
        return _timed_out(server.request_timeout).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error", "internal_error").response()

    route: Callable[..., Any]
    # one server-sent event: `data` is a JSON chunk, an error object, or [DONE]
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                            "properties": {"data": {"type": "string"}}}}}
    for path, route, ok, errors in (
            ("/v1/completions", server.completions, P.CompletionResponse, _GENERATE_ERRORS),
            ("/v1/chat/completions", server.chat, P.ChatCompletionResponse, _GENERATE_ERRORS),
            ("/tokenize", server.tokenize, P.TokenizeResponse, _BODY_ERRORS),
            ("/detokenize", server.detokenize, P.DetokenizeResponse, _BODY_ERRORS)):
        streams = errors is _GENERATE_ERRORS
        app.add_api_route(path, route, methods=["POST"], dependencies=auth, responses={
            200: {"model": ok, "description": "OK" + (" (text/event-stream when stream is true)" if streams else ""),
                  **({"content": sse} if streams else {})}, **errors})
    app.add_api_route("/v1/models", server.models, methods=["GET"], dependencies=auth,
                      responses={200: {"model": P.ModelList, "description": "Served models"}})

    async def openapi_json() -> Response:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, server.api_key is not None)
        return Response(json.dumps(app.openapi_schema), media_type="application/json")

    app.add_api_route("/openapi.json", openapi_json, methods=["GET"], dependencies=auth, include_in_schema=False)

    @app.get("/health", responses={
        200: {"description": "The engine is serving", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}}}},
        503: {**_ERROR, "description": "The engine has stopped"}})
    async def health() -> Response:
        if engine.is_healthy:
            return Response(b'{"status":"ok"}', media_type="application/json")
        reason = engine.unavailable_reason or "the engine is not running"  # no internals: they are logged
        return APIError(503, reason, "service_unavailable_error", code="engine_unavailable").response()

    @app.get("/metrics", dependencies=auth if metrics_require_auth else [], response_class=PlainTextResponse,
             responses={
        200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
