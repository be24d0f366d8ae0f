"""What the engine hands back: RequestOutput with one CompletionOutput per sample (vLLM's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[Logprob] | None = None
    new_text: str = ""  # text added since the previous output of this request (streaming)
    new_token_ids: list[int] = field(default_factory=list)
    # Per generated token: per mixing site (layer 0 attn, layer 0 mlp, ..., output head) the depth
    # weights over that site's sources. None unless SamplingParams.depth_attention.
    depth_attention: list[list[list[float]]] | None = None
    new_depth_attention: list[list[list[float]]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed inside the engine
    prompt_depth_attention: list[list[list[float]]] | None = None  # per prompt token, when asked for
