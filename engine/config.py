"""Engine configuration: frozen dataclasses, validated on construction, no I/O.

ModelConfig lives in models.config (models never import engine); it is re-exported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kernels.ops import BACKENDS
from models.config import ModelConfig
from models.quantization import QUANT_ACTIVATIONS, check_quantization

__all__ = ["AUTO", "DEFAULT_KV_CACHE_MEMORY", "DTYPE_CHOICES", "DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE", "CacheConfig", "EngineConfig", "ModelConfig", "ParallelConfig", "SchedulerConfig", "SpeculativeConfig", "parse_bytes", "parse_dtype",
           "resolve_dtype"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_KV_CACHE_MEMORY = 1 << 30  # the KV budget on the CPU when --kv-cache-memory is not given
DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE = 256  # the largest decode batch captured, unless max_num_seqs is smaller
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_bytes(value: str | int) -> int:
    """'512MiB', '2GB', '1g', 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size: use e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)


def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """A dtype spelling -> torch.dtype; "auto" stays "auto" until the checkpoint is read (resolve_dtype)."""
    if isinstance(name, torch.dtype) or name == AUTO:
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {name!r}")
    return DTYPES[name]


def resolve_dtype(requested: torch.dtype | str, stored: torch.dtype | None, device: str) -> tuple[torch.dtype, str]:
    """The serving dtype for `--dtype requested` and the checkpoint's stored dtype, and why (for the log).

    auto keeps the checkpoint's precision (bf16 stays bf16, fp32 stays fp32), except float16 on a CPU
    (CPU float16 matmuls are emulated; bfloat16 has the same size and the native kernels) and a quantized
    checkpoint (no float type of its own), which get bfloat16: on CPU it decodes faster than fp32
    (the small-M kernel streams half the bytes; loadtest/RESULTS.md) and prefill computes in fp32 anyway.
    """
    if isinstance(requested, torch.dtype):
        return requested, "as requested"
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if stored is None:
        return torch.bfloat16, "auto: the checkpoint is quantized"
    if stored == torch.float16 and not device.startswith("cuda"):
        return torch.bfloat16, "auto: the checkpoint is float16, which a CPU emulates"
    return stored, f"auto: the checkpoint's dtype ({name.get(stored, str(stored))})"


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # bytes for the paged token KV cache (all layers, this rank); None: DEFAULT_KV_CACHE_MEMORY on the CPU, and on
    # CUDA what gpu_memory_utilization leaves after the weights and a profiled peak step
    kv_cache_memory: int | None = None
    depth_cache_memory: int = 256 << 20  # bytes for the per-step AttnRes depth pool
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # override the budget (tests)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the GPU's memory this engine may use (CPU: unused)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be > 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.depth_cache_memory <= 0:
            raise ValueError("depth_cache_memory must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens per step, decode and prefill chunks together
    max_model_len: int | None = None  # prompt + output; defaults to the model's max_position_embeddings
    long_prefill_token_threshold: int = 0  # cap one prompt's chunk per step (0: budget only)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


SPEC_METHODS = ("ngram", "depth")
SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "exit_block",
             "disable_by_batch_size")
# keys only one method reads: given with the other method they are an error, not silently ignored
_METHOD_KEYS = {"ngram": ("prompt_lookup_min", "prompt_lookup_max"), "depth": ("exit_block",)}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: drafts verified in the next step's forward.

    method "ngram" (vLLM's keys): draft up to `num_speculative_tokens` tokens that followed the latest earlier
    occurrence of the longest suffix n-gram (prompt_lookup_max..min) of a request's own tokens.
    method "depth" (Block AttnRes only): self-speculation by early exit; each draft is the argmax of the output
    head (output mix, final norm, lm_head) applied to the block states after the first `exit_block` blocks."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    exit_block: int | None = None  # depth: Block AttnRes blocks the draft passes run (1 <= exit_block < N)
    # no drafts in a step while this many requests or more are running (vLLM's key): verifying 1 + k rows per
    # request pays at batch 1, where a step reads the weights for one row, but not once the linears turn
    # compute bound (on a 2-core CPU from about 8 requests); None: draft at any batch size
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.method not in SPEC_METHODS:
            errors.append(f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}; got {self.method!r}")
        checks = [("num_speculative_tokens", 1), ("prompt_lookup_min", 1), ("prompt_lookup_max", 1)]
        if self.disable_by_batch_size is not None:
            checks.append(("disable_by_batch_size", 1))
        if self.method == "depth":
            if self.exit_block is None:
                errors.append("speculative_config.exit_block is required with method \"depth\" (the number of "
                              "Block AttnRes blocks a draft pass runs)")
            else:
                checks.append(("exit_block", 1))
        elif self.exit_block is not None:
            errors.append(f"speculative_config.exit_block applies to method \"depth\" only, not {self.method!r}")
        for name, low in checks:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                errors.append(f"speculative_config.{name} must be an integer >= {low}, got {v!r}")
        if not errors and self.prompt_lookup_min > self.prompt_lookup_max:
            errors.append(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                          f"prompt_lookup_max ({self.prompt_lookup_max})")
        if errors:
            raise ValueError("; ".join(errors))

    def check_model(self, cfg: ModelConfig) -> None:
        """ValueError naming the key unless this config fits the model (known once config.json is read)."""
        if self.method != "depth":
            return
        if cfg.attn_res_mode != "block":
            raise ValueError(f"speculative_config.method \"depth\" needs a Block AttnRes model (attn_res_mode "
                             f"\"block\"); this model's attn_res_mode is {cfg.attn_res_mode!r}")
        n = cfg.num_depth_blocks
        if self.exit_block is not None and self.exit_block >= n:
            raise ValueError(f"speculative_config.exit_block must be < the model's number of blocks ({n}: "
                             f"{cfg.num_hidden_layers} layers, attn_res_block_size {cfg.attn_res_block_size}); "
                             f"got {self.exit_block}")

    def draft_layers(self, cfg: ModelConfig) -> int:
        """depth: the decoder layers a draft pass runs (the first exit_block blocks)."""
        assert self.exit_block is not None
        return min(self.exit_block * cfg.attn_res_block_size, cfg.num_hidden_layers)

    @classmethod
    def from_dict(cls, d: dict) -> SpeculativeConfig:
        """From vLLM's JSON object; ValueError naming unknown or bad keys."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {d!r}")
        unknown = sorted(set(d) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(SPEC_KEYS)}")
        if "method" not in d:
            raise ValueError("speculative_config.method is required (\"ngram\" or \"depth\")")
        for method, keys in _METHOD_KEYS.items():
            wrong = [k for k in keys if k in d and d["method"] != method]
            if wrong and d["method"] in SPEC_METHODS:
                raise ValueError(f"speculative_config.{wrong[0]} applies to method \"{method}\" only, "
                                 f"not {d['method']!r}")
        return cls(**d)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: torch.dtype | str = AUTO  # "auto": resolve_dtype() once the checkpoint is read
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    depth_stats: bool = False  # aggregate AttnRes depth weights of every sampled token (for metrics)
    device: str = "cpu"  # where the model, KV cache, depth pool, step inputs and sampler live: cpu or cuda
    kernels: str = "auto"  # op backend (kernels.ops.BACKENDS): auto | native | reference | triton
    enforce_eager: bool = False  # never capture CUDA graphs
    max_cuda_graph_batch_size: int | None = None  # largest captured decode batch (None: min(max_num_seqs, 256))
    speculative: SpeculativeConfig | None = None  # None: no drafts (the non-speculative path, unchanged)
    quantization: str = "auto"  # weights served in a quantized block format (models/quantization.py)
    # int8: quantized linears round the activations of steps past ops.INT8_MIN_M rows to int8 blocks (VNNI CPUs);
    # none: weight-only (the activations never rounded)
    quant_activations: str = "none"
    # pure-decode CPU steps of at most this many rows run on one thread (None: 2 under the HTTP server, whose
    # event loop and response streams need a core, 0 offline; see LLMEngine._step_threads)
    small_step_rows: int | None = None

    def __post_init__(self) -> None:
        if self.max_cuda_graph_batch_size is not None and self.max_cuda_graph_batch_size < 1:
            raise ValueError(f"max_cuda_graph_batch_size must be >= 1, got {self.max_cuda_graph_batch_size}")
        if self.kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}; got {self.kernels!r}")
        object.__setattr__(self, "quantization", check_quantization(self.quantization))
        if self.quant_activations not in QUANT_ACTIVATIONS:
            raise ValueError(f"quant_activations must be one of {', '.join(QUANT_ACTIVATIONS)}; "
                             f"got {self.quant_activations!r}")
