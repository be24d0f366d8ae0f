"""/v1/chat/completions: its request and response builders for the shared pipeline (serving_engine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.outputs import CompletionOutput
from server import protocol as P
from server.openai import engine_outputs as O
from server.openai.engine_outputs import Choice
from server.openai.serving_engine import Job, OpenAIServing, Prompt


class OpenAIServingChat(OpenAIServing[P.ChatCompletionRequest]):
    request_model = P.ChatCompletionRequest
    response_model = P.ChatCompletionResponse
    stream_model = P.ChatCompletionStreamResponse
    id_prefix = "chatcmpl"
    prompt_field = "messages"

    async def create_chat_completion(self, request: Request, body: P.ChatCompletionRequest) -> Response:
        return await self.generate(request, body)

    def prompts(self, req: P.ChatCompletionRequest) -> Callable[[], list[Prompt]]:
        return lambda: [self.tokens.render_chat(req.messages, req.add_generation_prompt)]

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
        return O.chat_choice(out, choice, req, self.tokens.token_text)

    def stream_prologue(self, job: Job, req: P.ChatCompletionRequest) -> list[P.ChatStreamChoice]:
        return [P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(role="assistant", content=""))
                for c in job.by_index()]  # the role comes first

    def stream_choices(self, out: CompletionOutput, choice: Choice,
                       req: P.ChatCompletionRequest) -> list[P.ChatStreamChoice]:
        return O.chat_stream_choices(out, choice, req, self.tokens.token_text)
