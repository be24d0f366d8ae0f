"""/tokenize, /detokenize and /tokenizer_info (vLLM's extensions): the model's tokenizer over HTTP."""

from __future__ import annotations

import asyncio

from fastapi.responses import Response

from engine.async_engine import AsyncLLMEngine
from models.tokenizer import DEFAULT_CHAT_TEMPLATE
from server import protocol as P
from server.errors import APIError
from server.openai.serving_engine import ServedModels, Tokens, json_response


class OpenAIServingTokenization:
    def __init__(self, engine: AsyncLLMEngine, models: ServedModels, tokens: Tokens) -> None:
        self.engine = engine
        self.models = models
        self.tokens = tokens

    def _tokenizer(self, model: str | None):  # type: ignore[no-untyped-def]
        self.models.check(model)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        return tok

    async def tokenize(self, body: P.TokenizeRequest) -> Response:
        tok = self._tokenizer(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")

        def encode() -> list[int]:  # on a worker thread: a long text must not stall the event loop
            text = body.prompt if body.prompt is not None else self.tokens.render_chat(body.messages or [],
                                                                                      body.add_generation_prompt)
            return tok.encode(text, add_special_tokens=body.add_special_tokens or body.messages is not None)

        ids = await asyncio.to_thread(encode)
        return json_response(P.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids))

    async def tokenizer_info(self, model: str | None = None) -> Response:
        tok = self._tokenizer(model)
        return json_response(P.TokenizerInfoResponse(
            tokenizer_class="SentencePieceTokenizer" if tok.is_sentencepiece else "PreTrainedTokenizerFast",
            bos_token=tok.bos_token or None, eos_token=tok.eos_token or None, pad_token=tok.pad_token,
            unk_token=tok.unk_token, add_bos_token=tok.add_bos, chat_template=tok.chat_template or DEFAULT_CHAT_TEMPLATE,
            model_max_length=self.engine.max_model_len, vocab_size=self.engine.vocab_size))

    async def detokenize(self, body: P.DetokenizeRequest) -> Response:
        tok = self._tokenizer(body.model)
        vocab = self.engine.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return json_response(P.DetokenizeResponse(prompt=await asyncio.to_thread(tok.decode, body.tokens)))
