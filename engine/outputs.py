"""What the engine hands back: RequestOutput with one CompletionOutput per sample (vLLM's shape).

How much each output carries is the request's `SamplingParams.output_kind` (vLLM's RequestOutputKind):
DELTA outputs carry only what is new since the previous one (streams), FINAL_ONLY one output at the
end with everything (non-streaming answers, the offline API). Per-step work is then O(new tokens), never
O(tokens so far).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DepthEntry = list[list[float]]  # one forward pass: per mixing site, the weights over its sources


class RequestOutputKind(enum.Enum):
    DELTA = "delta"  # each output: only the new text, token ids, logprobs and depth entries
    FINAL_ONLY = "final_only"  # one output, when the request finishes, with everything


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first
    rank: int | None = None  # of token_id in its distribution (1 = the most likely); set for prompt tokens


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[Logprob] | None = None  # one per token in token_ids, when asked for
    # Per token in token_ids: per mixing site (layer 0 attn, layer 0 mlp, ..., output head) the depth
    # weights over that site's sources, from the forward pass that produced the token.
    depth_attention: list[DepthEntry] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: CompletionOutput) -> None:
        """Append a later delta of the same sample (a slow reader's outputs are merged, not queued)."""
        self.text += later.text
        self.token_ids += later.token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.depth_attention is not None:
            self.depth_attention = (self.depth_attention or []) + later.depth_attention
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


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
    outputs: list[CompletionOutput]  # DELTA: the samples that changed; FINAL_ONLY: all n, by index
    finished: bool  # every sample has finished
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed inside the engine
    # Per prompt token, when asked for (echo): in the first output that follows the prompt's last pass.
    prompt_depth_attention: list[DepthEntry] | None = None
    # Per prompt token, when SamplingParams.prompt_logprobs asks (vLLM's RequestOutput.prompt_logprobs): None for
    # the first token (nothing precedes it), then its logprob given the tokens before it, with top alternatives.
    # In the first output after the prompt's last pass, like prompt_depth_attention.
    prompt_logprobs: list[Logprob | None] | None = None

    def merge(self, later: RequestOutput) -> None:
        """Fold a later DELTA output of the same request into this one."""
        mine = {c.index: c for c in self.outputs}
        for comp in later.outputs:
            if comp.index in mine:
                mine[comp.index].merge(comp)
            else:
                self.outputs.append(comp)
        self.finished, self.metrics = later.finished, later.metrics
        self.error = self.error or later.error
        if self.prompt_depth_attention is None:
            self.prompt_depth_attention = later.prompt_depth_attention
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
