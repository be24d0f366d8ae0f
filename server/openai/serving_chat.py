"""/v1/chat/completions: its request and response builders for the shared pipeline (serving_engine), and
tool calls (tool_calls.py) on top of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.outputs import CompletionOutput
from engine.structured import StructuredOutputsParams
from server import protocol as P
from server.errors import APIError
from server.openai import engine_outputs as O
from server.openai import structured as S
from server.openai import tool_calls as T
from server.openai.engine_outputs import Choice
from server.openai.serving_engine import Job, OpenAIServing, Prompt


class OpenAIServingChat(OpenAIServing[P.ChatCompletionRequest]):
    request_model = P.ChatCompletionRequest
    response_model = P.ChatCompletionResponse
    stream_model = P.ChatCompletionStreamResponse
    id_prefix = "chatcmpl"
    prompt_field = "messages"
    tool_call_parser: str | None = None  # set by build_app with --enable-auto-tool-choice

    async def create_chat_completion(self, request: Request, body: P.ChatCompletionRequest) -> Response:
        return await self.generate(request, body)

    def tool_plan(self, req: P.ChatCompletionRequest) -> T.ToolPlan | None:
        return T.plan(req, self.tool_call_parser)

    def prompts(self, req: P.ChatCompletionRequest) -> Callable[[], list[Prompt]]:
        tp = self.tool_plan(req)
        tools = tp.template_tools() if tp is not None else None
        return lambda: [self.tokens.render_chat(req.messages, req.add_generation_prompt, tools)]

    def structured(self, req: P.ChatCompletionRequest) -> tuple[StructuredOutputsParams | None, str | None]:
        spec, field = S.spec_of(req)
        tp = self.tool_plan(req)
        forced = tp.spec() if tp is not None else None
        if forced is None:
            return spec, field
        if spec is not None:
            raise APIError(400, f"tool_choice {tp.mode!r} cannot be combined with {field}", param=field)
        return forced, "tools"

    def sampling_args(self, req: P.ChatCompletionRequest) -> tuple[int | None, int | None]:
        return req.effective_max_tokens, (req.top_logprobs or 0) if req.logprobs else None

    def param_aliases(self, req: P.ChatCompletionRequest) -> dict[str, str]:
        # SamplingParams.logprobs is chat's top_logprobs; its max_tokens the field the client set
        aliases = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            aliases["max_tokens"] = "max_completion_tokens"
        return aliases

    def response_extra(self, job: Job, req: P.ChatCompletionRequest) -> dict[str, Any]:
        if req.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": O.prompt_logprobs(job.by_index()[0], req.prompt_logprobs, self.tokens.token_text)}

    def final_choice(self, out: CompletionOutput, choice: Choice, req: P.ChatCompletionRequest) -> P.ChatChoice:
        c = O.chat_choice(out, choice, req, self.tokens.token_text)
        tp = self.tool_plan(req)
        if tp is not None and tp.mode != "none":
            content, calls = T.parse_output(tp, out.text)
            if calls:
                c.message = P.ChatMessageOut(content=content, tool_calls=calls)
                c.finish_reason = "tool_calls"
        return c

    def stream_prologue(self, job: Job, req: P.ChatCompletionRequest) -> list[P.ChatStreamChoice]:
        return [P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(role="assistant", content=""))
                for c in job.by_index()]  # the role comes first

    def stream_choices(self, out: CompletionOutput, choice: Choice,
                       req: P.ChatCompletionRequest) -> list[P.ChatStreamChoice]:
        chunks = O.chat_stream_choices(out, choice, req, self.tokens.token_text)
        tp = self.tool_plan(req)
        if tp is None or tp.mode == "none":
            return chunks
        if choice.tool_stream is None:
            choice.tool_stream = T.ToolStream(tp)
        content, calls = choice.tool_stream.feed(out.text, out.finished)
        result = []
        for ch in chunks:  # the content delta is replaced by what the tool stream lets out
            if ch.finish_reason is not None:
                continue
            if content is not None or calls or ch.logprobs is not None or ch.depth_attention:
                result.append(P.ChatStreamChoice(index=ch.index, delta=P.DeltaMessage(
                    content=content, tool_calls=calls or None), logprobs=ch.logprobs,
                    depth_attention=ch.depth_attention))
                content, calls = None, []
        if content is not None or calls:  # nothing new from the engine but the stream had text held back
            result.append(P.ChatStreamChoice(index=choice.index,
                                             delta=P.DeltaMessage(content=content, tool_calls=calls or None)))
        if out.finished:
            reason = "tool_calls" if choice.tool_stream.calls_sent and out.finish_reason == "stop" \
                else out.finish_reason
            result.append(P.ChatStreamChoice(index=choice.index, delta=P.DeltaMessage(), finish_reason=reason))
        return result
