"""OpenAI-compatible request/response schemas (pydantic v2), plus vLLM's sampling extensions.

Requests are strict (no "1" -> 1 or true -> 1 coercion) and reject unknown fields, as OpenAI does,
so a typo like `max_token` is a 400 rather than a silently ignored setting. Fields OpenAI defines that
this server cannot honour (suffix, ...) are accepted by the schema and refused with a
clear message by `unsupported()`, naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from engine.sampling_params import SamplingParams

# Stop strings and ids are checked against every new token on the engine thread: a request must not be
# able to slow every other request's step down with thousands of them.
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors ---------------------------------------------------------------------------------------


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# ---- shared request fields --------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # depthserve extension: per token, the AttnRes depth weights of every mixing site (AttnRes models only)
    depth_attention: bool = False
    # vLLM extension: per prompt token, its logprob given the tokens before it and this many top alternatives
    prompt_logprobs: int | None = None
    # structured outputs (server/openai/structured.py): OpenAI's response_format, vLLM's fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a set field this server cannot honour."""
        if self.logit_bias and not all(k.isascii() and k.isdigit() and len(k) <= 12 for k in self.logit_bias):
            return "logit_bias", "logit_bias keys must be token ids written as strings of digits, e.g. {\"50256\": -100}"
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            return "stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
        if self.stop_token_ids and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            return "stop_token_ids", (f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, "
                                      f"got {len(self.stop_token_ids)}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            return "seed", f"seed must be a 64-bit signed integer, got {self.seed}"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.prompt_logprobs is not None and self.stream:  # as vLLM
            return "prompt_logprobs", ("prompt_logprobs are not available when stream is true (on /v1/completions, "
                                       "echo with logprobs streams the prompt's logprobs in the first chunk)")
        return None

    def wanted_prompt_logprobs(self, logprobs: int | None) -> int | None:
        """SamplingParams.prompt_logprobs: how many top alternatives each prompt token needs, or None."""
        return self.prompt_logprobs

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Map to SamplingParams (which raises ValueError naming a bad field)."""
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens, depth_attention=self.depth_attention,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            prompt_depth_attention=self.depth_attention and bool(getattr(self, "echo", False)),
            prompt_logprobs=self.wanted_prompt_logprobs(logprobs))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---- /v1/completions --------------------------------------------------------------------------------


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported (it must be unset or equal to n)"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens must be >= 1 (0 is allowed with echo: it scores the prompt without generating)"
        return super().unsupported()

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt (with its logprobs), nothing generated."""
        return self.echo and self.max_tokens == 0

    def wanted_prompt_logprobs(self, logprobs: int | None) -> int | None:
        if self.echo and logprobs is not None:  # OpenAI's legacy echo + logprobs: an entry per prompt token
            return max(logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs


class CompletionLogprobs(_Response):
    """OpenAI's legacy completions logprobs shape."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


DepthAttention = list[list[list[float]]]  # per token: per mixing site: weights over its sources


class PromptLogprob(_Response):
    """vLLM's prompt_logprobs entry for one token: rank 1 is the most likely."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else token id -> its entry (the prompt token and the
# top alternatives)
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string or token that ended it
    depth_attention: DepthAttention | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions ---------------------------------------------------------------------------


class ContentPart(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(extra="allow", strict=True)  # tool_calls, refusal, ... pass to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM extension
    add_generation_prompt: bool = True

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            return "top_logprobs", f"top_logprobs must be in [0, 20], got {self.top_logprobs}"
        return super().unsupported()

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatLogprobEntry] | None = None


class FunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None  # a JSON object, as text

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCall(_Response):
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall
    index: int | None = None  # streamed deltas only

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatMessageOut(_Response):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    depth_attention: DepthAttention | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(_Response):
    """A streamed chat delta: unset fields are left out (`{"content": "x"}`, `{}` at the end)."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    depth_attention: DepthAttention | None = None


class ChatCompletionStreamResponse(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/models, /tokenize, /detokenize ----------------------------------------------------------------


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "depthserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class TokenizerInfoResponse(_Response):
    """vLLM's /tokenizer_info: what a harness's remote tokenizer needs (lm-evaluation-harness reads the special
    tokens' text and asks /tokenize for their ids, and renders chats with the template)."""

    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None  # the one the server applies (a default when the checkpoint has none)
    model_max_length: int
    vocab_size: int


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str
