"""EngineArgs: the one list of engine options, their defaults, help and validation.

Every front-end builds its EngineConfig through it: `LLM(model, **kwargs)`, `depthserve serve`
(`EngineArgs.add_cli_args` / `from_cli_args`), the benchmarks and the tests. In the style of vLLM's
`EngineArgs` (vllm/engine/arg_utils.py): one field per option, one default, one help string in the
field's metadata, and `create_engine_config()` validating everything once, naming the field (and its flag).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import (
    DEVICES,
    DTYPES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_bytes,
    parse_dtype,
)
from models.loader import DEFAULT_MODEL

__all__ = ["EngineArgs", "flag_name", "option"]


def option(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 - argparse's own word
    """A dataclass field with its one default and help string; `cli` holds extra add_argument keywords
    (`type`, `metavar`, `choices`, `flags` for extra/alternative option strings, `action`)."""
    return field(default=default, metadata={"help": help, "cli": cli})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields_to_group(group: argparse._ArgumentGroup, cls: type) -> None:
    """One argparse option per field of the dataclass `cls`, its default the field's default."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        cli = dict(meta.get("cli", {}))
        flags = cli.pop("flags", None) or [flag_name(f.name)]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if isinstance(default, bool) and "action" not in cli:
            cli["action"] = "store_true"
        group.add_argument(*flags, dest=f.name, default=default, help=meta["help"], **cli)


class CliArgs:
    """add_cli_args / from_cli_args for a dataclass of `option(...)` fields: one flag per field, in the
    argument group named by GROUP."""

    GROUP = "options"

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_fields_to_group(parser.add_argument_group(cls.GROUP), cls)
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> Any:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _at_least(errors: list[str], name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        errors.append(f"{name} must be an integer, got {value!r} ({flag_name(name)})")
    elif value < low:
        errors.append(f"{name} must be >= {low}, got {value} ({flag_name(name)})")


def _size(errors: list[str], name: str, value: str | int) -> int:
    try:
        n = parse_bytes(value)
    except (ValueError, TypeError):
        errors.append(f"{name}: cannot read {value!r} as a size: use e.g. 512MiB, 2GiB or a number of bytes "
                      f"({flag_name(name)})")
        return 0
    if n <= 0:
        errors.append(f"{name} must be > 0 bytes, got {value!r} ({flag_name(name)})")
    return n


@dataclass
class EngineArgs(CliArgs):
    """Engine options. Field names are `LLM(...)` keywords; `--field-name` are the CLI flags."""

    GROUP = "engine"

    model: str = option(DEFAULT_MODEL, "a Hugging Face style checkpoint folder, a .gguf file or the name of a "
                                       "built-in model")
    dtype: str | torch.dtype = option("float32", "weight/activation dtype (float32, bfloat16, float16; "
                                                 "also fp32, bf16, fp16)", choices=list(DTYPES))
    device: str = option("auto", "where the model, KV cache and sampling run: cpu, cuda (one GPU, eager), or "
                                 "auto (cuda when torch.cuda.is_available(), else cpu)", choices=list(DEVICES))
    seed: int = option(0, "seed for sampling requests that set none", type=int)
    num_threads: int | None = option(None, "torch intra-op threads (None: torch's default)", type=int)
    depth_stats: bool = option(False, "aggregate the AttnRes depth weights of every sampled token and export "
                                      "per-site means and entropies as metrics (costs a little per step)",
                               flags=["--depth-stats", "--depth-metrics"])
    kernels: str = option("auto", "op implementations: native (oneDNN linears on weights prepacked at load; "
                                  "C++ norms and AttnRes ops, compiled once and cached), reference (plain "
                                  "PyTorch) or auto (native where its ops work on this machine, else reference "
                                  "with a warning)", choices=["auto", "native", "reference"])
    # scheduler
    max_model_len: int | None = option(None, "prompt + output tokens per request (None: the model's "
                                             "max_position_embeddings)", type=int)
    max_num_seqs: int = option(64, "requests in the running batch at once", type=int)
    max_num_batched_tokens: int = option(2048, "tokens per step (decode tokens and prefill chunks share it)",
                                         type=int)
    long_prefill_token_threshold: int = option(0, "cap one prompt's prefill chunk per step at this many tokens, "
                                                  "so long prompts do not stall decodes (0: the step budget only)",
                                               type=int)
    # cache
    block_size: int = option(16, "tokens per KV cache block", type=int)
    kv_cache_memory: str | int = option("1GiB", "bytes for the paged KV cache (all layers, this rank), "
                                                "e.g. 512MiB")
    depth_cache_memory: str | int = option("256MiB", "bytes for the per-step AttnRes depth pool, e.g. 256MiB")
    num_kv_blocks: int | None = option(None, "number of KV blocks, overriding the --kv-cache-memory budget",
                                       type=int)
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompt prefixes already computed",
                                         action=argparse.BooleanOptionalAction)
    # parallel
    tensor_parallel_size: int = option(1, "tensor-parallel ranks (processes the model is sharded over)",
                                       type=int)

    @classmethod
    def from_kwargs(cls, model: str, caller: str = "EngineArgs", /, **kwargs: Any) -> EngineArgs:
        """EngineArgs(model=model, **kwargs), with a TypeError naming every unknown keyword."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{caller}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known - {'model'}))}")
        return cls(model=model, **kwargs)

    def _device(self, errors: list[str]) -> str:
        """'auto' -> cuda when available (cpu with tensor parallelism, which runs over gloo), else cpu."""
        if self.device not in DEVICES:
            errors.append(f"device must be one of {', '.join(DEVICES)}; got {self.device!r} (--device)")
            return "cpu"
        tp = self.tensor_parallel_size
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() and tp == 1 else "cpu"
        if self.device == "cuda":
            if not torch.cuda.is_available():
                errors.append("device='cuda' but torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                              "build): install a CUDA build of torch or use device='cpu' (--device)")
            elif isinstance(tp, int) and tp > 1:
                errors.append(f"device='cuda' with tensor_parallel_size={tp}: NCCL tensor parallelism is not "
                              "implemented yet; use tensor_parallel_size=1 on cuda, or device='cpu' for gloo "
                              "tensor parallelism (--device, --tensor-parallel-size)")
        return self.device

    def create_engine_config(self) -> EngineConfig:
        """Validate every option (ValueError naming the field and flag, all problems in one message)."""
        errors: list[str] = []
        if not isinstance(self.model, str) or not self.model:
            errors.append(f"model must be a non-empty path or name, got {self.model!r} (--model)")
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError:
            errors.append(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r} (--dtype)")
            dtype = torch.float32
        device = self._device(errors)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            errors.append(f"seed must be an integer, got {self.seed!r} (--seed)")
        _at_least(errors, "num_threads", self.num_threads, 1, optional=True)
        _at_least(errors, "max_model_len", self.max_model_len, 2, optional=True)
        _at_least(errors, "max_num_seqs", self.max_num_seqs, 1)
        _at_least(errors, "max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _at_least(errors, "long_prefill_token_threshold", self.long_prefill_token_threshold, 0)
        _at_least(errors, "block_size", self.block_size, 1)
        kv_bytes = _size(errors, "kv_cache_memory", self.kv_cache_memory)
        depth_bytes = _size(errors, "depth_cache_memory", self.depth_cache_memory)
        _at_least(errors, "num_kv_blocks", self.num_kv_blocks, 1, optional=True)
        _at_least(errors, "tensor_parallel_size", self.tensor_parallel_size, 1)
        for name in ("enable_prefix_caching", "depth_stats"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kernels not in ("auto", "native", "reference"):
            errors.append(f"kernels must be one of auto, native, reference; got {self.kernels!r} (--kernels)")
        if errors:
            raise ValueError("; ".join(errors))
        return EngineConfig(
            model=self.model, dtype=dtype, seed=self.seed, num_threads=self.num_threads,
            depth_stats=self.depth_stats, device=device, kernels=self.kernels,
            cache=CacheConfig(block_size=self.block_size, kv_cache_memory=kv_bytes, depth_cache_memory=depth_bytes,
                              enable_prefix_caching=self.enable_prefix_caching, num_kv_blocks=self.num_kv_blocks),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len,
                                      long_prefill_token_threshold=self.long_prefill_token_threshold),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size))
