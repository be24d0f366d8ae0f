"""SamplingParams: how one request picks its tokens and when it stops (vLLM's field names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidParameterError
from engine.outputs import RequestOutputKind
from engine.structured import StructuredOutputsParams

# Below this temperature, logits / T overflows or its softmax is a one-hot anyway: sample greedily (vLLM's
# _SAMPLING_EPS), so that T = 1e-300 gives the argmax rather than NaNs.
GREEDY_TEMPERATURE = 1e-5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_LOGIT_BIAS_TOKENS = 1024


def seed_for_sample(seed: int | None, j: int) -> int | None:
    """The seed of sample j of n: seed + j, wrapped into the generator's range (no overflow at the edge)."""
    if seed is None:
        return None
    span = SEED_MAX - SEED_MIN + 1
    return (seed + j - SEED_MIN) % span + SEED_MIN


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives per token (0: only the sampled one)
    # vLLM's prompt_logprobs: the logprob of every prompt token after the first, plus this many top
    # alternatives; such a request skips prefix-cache hits (every prompt row must be computed)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    skip_special_tokens: bool = True
    depth_attention: bool = False  # return, per generated token, the AttnRes depth weights of every site
    prompt_depth_attention: bool = False  # also per prompt token (echo); disables prefix-cache hits for it
    output_kind: RequestOutputKind = RequestOutputKind.DELTA  # DELTA for streams, FINAL_ONLY for one answer
    # a grammar the output must follow (JSON schema, regex, choice, EBNF); a dict is read as its fields
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise InvalidParameterError(f"structured_outputs: {e}", "structured_outputs") from e
        self.validate()

    def validate(self) -> None:
        """Raise InvalidParameterError (a ValueError) whose `param` is the offending field."""

        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidParameterError(f"{name} must be a finite number, got {v!r}", name)
            return float(v)

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidParameterError(f"{name} must be an integer, got {v!r}", name)
            if v < lo:
                raise InvalidParameterError(f"{name} must be >= {lo}, got {v}", name)

        integer("n", 1)
        if num("temperature") < 0:
            raise InvalidParameterError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < num("top_p") <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidParameterError(
                f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}", "top_k")
        if not 0 <= num("min_p") <= 1:
            raise InvalidParameterError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise InvalidParameterError(
                f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}", "seed")
        if self.max_tokens is not None:
            integer("max_tokens", 1)
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameterError("stop must be a string or a list of non-empty strings", "stop")
        if not isinstance(self.stop_token_ids, list | tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InvalidParameterError(f"stop_token_ids must be a list of non-negative integers, "
                                        f"got {self.stop_token_ids!r}", "stop_token_ids")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= num(name) <= 2:
                raise InvalidParameterError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if num("repetition_penalty") <= 0:
            raise InvalidParameterError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.logprobs is not None:
            integer("logprobs", 0)
            if self.logprobs > 20:
                raise InvalidParameterError(f"logprobs must be <= 20, got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", 0)
            if self.prompt_logprobs > 20:
                raise InvalidParameterError(f"prompt_logprobs must be <= 20, got {self.prompt_logprobs}",
                                            "prompt_logprobs")
        self._validate_logit_bias()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidParameterError("structured_outputs must be a StructuredOutputsParams or a dict of its fields",
                                        "structured_outputs")

    def _validate_logit_bias(self) -> None:
        def bad(message: str) -> InvalidParameterError:
            return InvalidParameterError(message, "logit_bias")

        if not isinstance(self.logit_bias, dict):
            raise bad(f"logit_bias must be a mapping of token ids to numbers, got {self.logit_bias!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise bad(f"logit_bias may name at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        for tok, bias in self.logit_bias.items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise bad(f"logit_bias keys must be non-negative token ids, got {tok!r}")
            if isinstance(bias, bool) or not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise bad(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {tok}")

    @property
    def skips_prefix_cache(self) -> bool:
        """Every prompt row must run (its depth weights or its logits are reported): no prefix-cache hit."""
        return self.prompt_depth_attention or self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Anything that edits the logits before sampling (penalties, logit_bias)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))
