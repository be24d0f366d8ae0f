"""The engine: scheduling, batching, sampling; `from engine import LLM, SamplingParams`."""

from engine.arg_utils import EngineArgs
from engine.llm_engine import LLM, LLMEngine
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "Logprob", "RequestOutput", "SamplingParams"]
