"""Several models behind one server: the request's `model` field picks the engine that serves it.

Each served engine gets its own endpoint objects (serving_completion, serving_chat, serving_tokenization),
exactly the ones a one-model server has, so a request to a model of a several-model server takes the same
path, and gives the same answer, as it would alone. `ModelRouter` only picks: a request naming no model
goes to the first; a name no engine serves is a 404 listing the served names. One engine may answer to
several names (`--served-model-name a b` with one `--model`), as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from engine.async_engine import AsyncLLMEngine
from server import protocol as P
from server.openai.serving_chat import OpenAIServingChat
from server.openai.serving_completion import OpenAIServingCompletion
from server.openai.serving_engine import ServedModels, Tokens, json_response
from server.openai.serving_tokenization import OpenAIServingTokenization


@dataclass(frozen=True)
class ServedEngine:
    """One engine, the names it answers to, and its endpoints."""

    engine: AsyncLLMEngine
    models: ServedModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization

    @property
    def names(self) -> list[str]:
        return self.models.names


class ModelRouter:
    """Routes by the request's `model`; the routes of build_app call these methods. `tool_call_parser`: the
    format every model's chat endpoint parses for tool_choice "auto" (--enable-auto-tool-choice)."""

    def __init__(self, served: Sequence[tuple[AsyncLLMEngine, Sequence[str]]],
                 request_timeout: float | None = None, tool_call_parser: str | None = None) -> None:
        if not served:
            raise ValueError("at least one model is needed")
        self.served: list[ServedEngine] = []
        self._by_name: dict[str, ServedEngine] = {}
        for engine, names in served:
            models = ServedModels(engine, names)
            tokens = Tokens(engine)
            chat = OpenAIServingChat(engine, models, tokens, request_timeout)
            chat.tool_call_parser = tool_call_parser  # every model's tool_choice "auto" (None: refused)
            s = ServedEngine(engine, models, OpenAIServingCompletion(engine, models, tokens, request_timeout),
                             chat, OpenAIServingTokenization(engine, models, tokens))
            for n in models.names:
                if n in self._by_name:
                    raise ValueError(f"served model name {n!r} is used twice: give each model its own name "
                                     "(--served-model-name)")
                self._by_name[n] = s
            self.served.append(s)
        # the names a request may give, for the 404 (ServedModels words it as a one-model server does)
        self._all = ServedModels(self.served[0].engine, list(self._by_name))

    @property
    def names(self) -> list[str]:
        return self._all.names

    @property
    def engines(self) -> list[AsyncLLMEngine]:
        return [s.engine for s in self.served]

    def pick(self, model: str | None) -> ServedEngine:
        """The engine serving `model` (the first when None); a 404 naming the served models otherwise."""
        return self._by_name[self._all.check(model)]

    async def create_completion(self, request: Request, body: P.CompletionRequest) -> Response:
        return await self.pick(body.model).completion.create_completion(request, body)

    async def create_chat_completion(self, request: Request, body: P.ChatCompletionRequest) -> Response:
        return await self.pick(body.model).chat.create_chat_completion(request, body)

    async def tokenize(self, body: P.TokenizeRequest) -> Response:
        return await self.pick(body.model).tokenization.tokenize(body)

    async def detokenize(self, body: P.DetokenizeRequest) -> Response:
        return await self.pick(body.model).tokenization.detokenize(body)

    async def tokenizer_info(self, model: str | None = None) -> Response:
        return await self.pick(model).tokenization.tokenizer_info(model)

    async def list(self) -> Response:
        cards = []
        for s in self.served:
            root = Path(str(s.engine.engine.config.model)).name  # the folder's name, not where it lives
            cards += [P.ModelCard(id=n, root=root, max_model_len=s.engine.max_model_len) for n in s.names]
        return json_response(P.ModelList(data=cards))
