"""/v1/completions: its request and response builders for the shared pipeline (serving_engine)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

from engine.outputs import CompletionOutput
from server import protocol as P
from server.errors import APIError
from server.openai import engine_outputs as O
from server.openai.engine_outputs import Choice
from server.openai.serving_engine import Job, OpenAIServing, Prompt


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
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


class OpenAIServingCompletion(OpenAIServing[P.CompletionRequest]):
    request_model = P.CompletionRequest
    response_model = P.CompletionResponse
    stream_model = P.CompletionStreamResponse
    id_prefix = "cmpl"
    prompt_field = "prompt"

    async def create_completion(self, request: Request, body: P.CompletionRequest) -> Response:
        return await self.generate(request, body)

    def prompts(self, req: P.CompletionRequest) -> Callable[[], list[Prompt]]:
        prompts = _prompts(req.prompt)
        return lambda: prompts

    def sampling_args(self, req: P.CompletionRequest) -> tuple[int | None, int | None]:
        # echo with max_tokens 0 scores the prompt: one token is generated (the prompt's last pass samples
        # anyway) and dropped, as vLLM does
        return (1 if req.echo_only else req.max_tokens), req.logprobs

    def shows_output(self, req: P.CompletionRequest) -> bool:
        return not req.echo_only

    def final_choice(self, out: CompletionOutput, choice: Choice, req: P.CompletionRequest) -> P.CompletionChoice:
        return O.completion_choice(out, choice, req, self.tokens.token_text)

    def stream_prologue(self, job: Job, req: P.CompletionRequest) -> list[P.CompletionChoice]:
        if not req.echo or req.logprobs is not None:  # echo + logprobs: the first chunk, with the prompt's logprobs
            return []
        return [P.CompletionChoice(index=c.index, text=c.prompt_text) for c in job.by_index()]

    def stream_choices(self, out: CompletionOutput, choice: Choice,
                       req: P.CompletionRequest) -> list[P.CompletionChoice]:
        return O.completion_stream_choices(out, choice, req, self.tokens.token_text)
