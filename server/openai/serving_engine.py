"""The generation pipeline shared by /v1/completions and /v1/chat/completions (vLLM's serving_engine).

`OpenAIServing.generate` runs one request: check the model, map the request to SamplingParams, build the
prompts and fan them out (n samples per prompt as separate engine requests, validated on a worker thread),
submit them, then either stream SSE events (ending with an error event on failure, then `data: [DONE]`)
or collect the finished outputs into one response. Every engine request is aborted in a `finally` when it
has not finished: a client that disconnects (streaming or not), or a request past `request_timeout`, frees
its KV blocks within a step.

Endpoints subclass it with their request/response builders (serving_completion, serving_chat). What reads
engine outputs lives in engine_outputs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestGroup,
    RequestTimeoutError,
)
from engine.outputs import RequestOutputKind
from engine.request import Request as EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams
from server import errors as E
from server import protocol as P
from server.errors import APIError
from server.openai import engine_outputs as O
from server.openai import structured as S
from server.openai import tool_calls as T
from server.openai.engine_outputs import Choice

logger = logging.getLogger("depthserve.server")

MAX_CHOICES = 256  # prompts x n in one request: more would flood the queue from a single call
SSE_DONE = "data: [DONE]\n\n"

Prompt = str | list[int]
Req = TypeVar("Req", bound=P._SamplingRequest)


def json_response(model: BaseModel, status: int = 200, **dump: Any) -> Response:
    return Response(model.model_dump_json(**dump), status_code=status, media_type="application/json")


def sse_event(model: BaseModel, **dump: Any) -> str:
    return f"data: {model.model_dump_json(**dump)}\n\n"


def sse_error(err: APIError) -> str:
    return f"data: {err.body().decode()}\n\n"


class ServedModels:
    """The names this server answers to: a request's `model` is only ever matched against them."""

    def __init__(self, engine: AsyncLLMEngine, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("at least one served model name is needed")
        self.engine = engine
        self.names = list(names)

    def check(self, name: str | None) -> str:
        """The served name a request asked for (the first one when it named none); 404 otherwise."""
        if name is None or name in self.names:
            return name or self.names[0]
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise APIError(404, f"The model `{shown}` does not exist. Served: {', '.join(self.names)}",
                       "not_found_error", param="model", code="model_not_found")

    async def list(self) -> Response:
        root = Path(str(self.engine.engine.config.model)).name  # the folder's name, not where it lives
        cards = [P.ModelCard(id=n, root=root, max_model_len=self.engine.max_model_len) for n in self.names]
        return json_response(P.ModelList(data=cards))


class Tokens:
    """Tokenizer work shared by the endpoints: decoding, tokens as display text, the chat template."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)

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

    def render_chat(self, messages: list[P.ChatMessage], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None = None) -> str:
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
        if not tok.template_knows_tools and (tools or any(m.get("tool_calls") for m in msgs)):
            msgs = T.for_plain_template(msgs, tools)
            tools = None
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools)
        except Exception as e:  # noqa: BLE001 - template errors are caused by the messages sent
            raise APIError(400, f"cannot apply the chat template to these messages: {E.scrub(str(e))}",
                           param="messages") from None
        if tok.add_bos and tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]  # encode() adds the BOS id itself
        return text


@dataclass
class Job:
    """One HTTP request's engine requests (a RequestGroup) and its choices, by (engine request id,
    sample index)."""

    id: str
    model: str
    group: RequestGroup
    choices: dict[tuple[str, int], Choice]
    created: int = field(default_factory=lambda: int(time.time()))

    def by_index(self) -> list[Choice]:
        return sorted(self.choices.values(), key=lambda c: c.index)

    def usage(self) -> P.UsageInfo:
        prompt = {c.prompt_index: c.num_prompt_tokens for c in self.choices.values()}
        completion = sum(c.num_tokens for c in self.choices.values())
        total_prompt = sum(prompt.values())
        return P.UsageInfo(prompt_tokens=total_prompt, completion_tokens=completion,
                           total_tokens=total_prompt + completion)


class EngineStream(StreamingResponse):
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


async def unless_disconnected(request: Request, group: RequestGroup, work: Awaitable[Response]) -> Response:
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


class OpenAIServing(Generic[Req]):
    """The shared pipeline; subclasses fill in the per-endpoint builders below."""

    request_model: ClassVar[type[P._SamplingRequest]]
    response_model: ClassVar[type[BaseModel]]  # its fields: id, created, model, choices, usage
    stream_model: ClassVar[type[BaseModel]]  # one SSE chunk, the same fields
    id_prefix: ClassVar[str]  # response ids: f"{id_prefix}-{hex}"
    prompt_field: ClassVar[str]  # the request field engine prompt errors are reported on

    def __init__(self, engine: AsyncLLMEngine, models: ServedModels, tokens: Tokens,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.models = models
        self.tokens = tokens
        self.request_timeout = request_timeout
        self.fields = list(self.request_model.model_fields)

    # ---- per endpoint ------------------------------------------------------------------------------
    def prompts(self, req: Req) -> Callable[[], list[Prompt]]:
        """Checks that need no tokenizer (they answer before SamplingParams' own), then what builds the
        prompts on a worker thread (a chat template or a long text must not stall the event loop)."""
        raise NotImplementedError

    def sampling_args(self, req: Req) -> tuple[int | None, int | None]:
        """(max_tokens, logprobs) for SamplingParams."""
        raise NotImplementedError

    def shows_output(self, req: Req) -> bool:
        """Whether generated tokens are shown and counted (completions: not for echo with max_tokens 0)."""
        return True

    def response_extra(self, job: Job, req: Req) -> dict[str, Any]:
        """Response-level fields beyond id, created, model, choices and usage (chat: prompt_logprobs)."""
        return {}

    def param_aliases(self, req: Req) -> dict[str, str]:
        """SamplingParams/engine names that this endpoint's request calls otherwise."""
        return {}

    def structured(self, req: Req) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint and the field that set it (chat adds tool calls)."""
        return S.spec_of(req)

    def aliases(self, req: Req) -> dict[str, str]:
        return {**S.aliases(self.structured(req)[1]), **self.param_aliases(req)}

    def final_choice(self, out: Any, choice: Choice, req: Req) -> BaseModel:
        """A finished engine output as a response choice."""
        raise NotImplementedError

    def stream_prologue(self, job: Job, req: Req) -> list[Any]:
        """Stream choices sent before any engine output (chat: the role; completions: an echo)."""
        return []

    def stream_choices(self, out: Any, choice: Choice, req: Req) -> list[Any]:
        """What one engine output adds to the stream."""
        raise NotImplementedError

    # ---- shared steps ------------------------------------------------------------------------------
    def response(self, job: Job, req: Req) -> BaseModel:
        """The non-streaming response, once every choice has its final output."""
        choices = [self.final_choice(c.final, c, req) for c in job.by_index()]
        return self.response_model(id=job.id, created=job.created, model=job.model, choices=choices,
                                   usage=job.usage(), **self.response_extra(job, req))

    def stream_response(self, job: Job, choices: list[Any], usage: P.UsageInfo | None = None) -> BaseModel:
        return self.stream_model(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)

    def sampling(self, req: Req) -> SamplingParams:
        bad = req.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0])
        max_tokens, logprobs = self.sampling_args(req)
        spec, _ = self.structured(req)
        try:
            return replace(req.sampling_params(max_tokens, logprobs), structured_outputs=spec)
        except ValueError as e:
            raise E.invalid_parameter(e, self.fields, self.prompt_field, self.aliases(req)) from None

    def fan_out(self, prompts: list[Prompt], params: SamplingParams, rid: str,
                aliases: dict[str, str]) -> tuple[list[EngineRequest], dict[tuple[str, int], Choice]]:
        """One engine request per prompt (the engine fans n samples out), all validated first."""
        if len(prompts) * params.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} exceeds {MAX_CHOICES} choices per request",
                           param="n")
        reqs, choices = [], {}
        for i, prompt in enumerate(prompts):
            try:
                r = self.engine.make_request(prompt, params, f"{rid}-{i}")
            except (ValueError, TypeError) as e:
                raise E.invalid_parameter(e, self.fields, self.prompt_field, aliases) from None
            text = prompt if isinstance(prompt, str) else self.tokens.decode(r.prompt_token_ids)
            for j in range(params.n):
                choices[r.request_id, j] = Choice(i * params.n + j, i, text, len(r.prompt_token_ids))
            reqs.append(r)
        return reqs, choices

    def submit(self, reqs: list[EngineRequest], deadline: float | None) -> RequestGroup:
        try:
            return self.engine.submit(reqs, deadline)
        except QueueFullError as e:
            raise E.queue_full(e) from None
        except EngineDeadError as e:
            raise E.engine_dead(e) from None

    async def generate(self, request: Request, req: Req) -> Response:
        """The whole request: a JSON response, or an SSE stream when `req.stream`."""
        deadline = getattr(request.state, "deadline", None)
        model = self.models.check(req.model)
        build_prompts = self.prompts(req)
        params = replace(self.sampling(req), output_kind=RequestOutputKind.DELTA if req.stream
                         else RequestOutputKind.FINAL_ONLY)
        aliases = self.aliases(req)
        rid = f"{self.id_prefix}-{uuid.uuid4().hex}"
        reqs, choices = await asyncio.to_thread(lambda: self.fan_out(build_prompts(), params, rid, aliases))
        for c in choices.values():
            c.shows_output = self.shows_output(req)
        job = Job(rid, model, self.submit(reqs, deadline), choices)
        if req.stream:
            return EngineStream(self.sse(self.stream(job, req)), job.group)
        return await unless_disconnected(request, job.group, self.collect(job, req))

    async def collect(self, job: Job, req: Req) -> Response:
        async for out in job.group:
            if out.error is not None:
                raise E.engine_error(out.error)
            for comp in out.outputs:
                O.update(job.choices[out.request_id, comp.index], out, comp)
        return json_response(self.response(job, req))

    async def stream(self, job: Job, req: Req) -> AsyncIterator[str]:
        exclude = None if req.include_usage else {"usage"}
        for choice in self.stream_prologue(job, req):
            yield sse_event(self.stream_response(job, [choice]), exclude=exclude)
        async for out in job.group:
            if out.error is not None:
                yield sse_error(E.engine_error(out.error))
                break
            for comp in out.outputs:
                c = job.choices[out.request_id, comp.index]
                O.update(c, out, comp)
                for choice in self.stream_choices(comp, c, req):
                    yield sse_event(self.stream_response(job, [choice]), exclude=exclude)
        else:
            if req.include_usage:
                yield sse_event(self.stream_response(job, [], job.usage()))

    async def sse(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """End every stream the same way: a failure becomes an SSE error event, then `data: [DONE]`."""
        try:
            async for event in events:
                yield event
        except EngineDeadError as e:
            yield sse_error(E.engine_dead(e))
        except RequestTimeoutError:
            yield sse_error(E.timed_out(self.request_timeout))
        except Exception:  # a bug must end the stream with an error event, not a cut connection
            logger.exception("streaming response failed")
            yield sse_error(E.internal_error())
        yield SSE_DONE
