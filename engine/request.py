"""A request inside the engine: tokens so far, how many have KV computed, and its state.

A step is `num_computed_tokens` catching up to `num_tokens` (vLLM v1): a prompt chunk, a prefix-cache
hit and a decode step are the same mechanism. Only the scheduler writes the counters and the token list;
text, stop strings and what was already handed out belong to the output processor.
"""

from __future__ import annotations

import enum
import time
from typing import Any

import torch

from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None, max_model_len: int = 0, eos_token_ids: tuple[int, ...] = (),
                 arrival_time: float | None = None, parent_id: str | None = None, index: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the id outputs are reported under (n > 1: the parent's)
        self.index = index  # which of the parent's n samples
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)  # on the sampler's device
        self.grammar: Any = None  # an llguidance matcher when params.structured_outputs is set (the engine's)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.monotonic())

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens})")
