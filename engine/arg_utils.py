"""EngineArgs: the one list of engine options, their defaults, help and validation.

Every front-end builds its EngineConfig through it: `LLM(model, **kwargs)`, `depthserve serve`
(`EngineArgs.add_cli_args` / `from_cli_args`), the benchmarks and the tests. In the style of vLLM's
`EngineArgs` (vllm/engine/arg_utils.py): one field per option, one default, one help string in the
field's metadata, and `create_engine_config()` validating everything once, naming the field (and its flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from engine.config import (
    DEVICES,
    DTYPE_CHOICES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_bytes,
    parse_dtype,
)
from kernels.ops import BACKENDS
from models.loader import DEFAULT_MODEL
from models.quantization import QUANT_ACTIVATIONS, QUANTIZATION_CHOICES, check_quantization

__all__ = ["DefaultsFormatter", "EngineArgs", "FriendlyParser", "flag_name", "option"]


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: not for flags off by default, nor where the help already says it
    (BooleanOptionalAction adds its own; `(None: ...)` explains an unset option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class FriendlyParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest flag or choice (`--max-num-seq` -> did you mean
    `--max-num-seqs`?) after this command's own usage, with DefaultsFormatter unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo is an error with a suggestion, not another flag
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)}\n")

    def _suggestion(self, message: str) -> str:
        if (m := re.search(r"unrecognized arguments: (.*)", message)) is not None:
            words = [w.split("=", 1)[0] for w in m.group(1).split() if w.startswith("-")]
            known = list(self._option_string_actions)
        elif (m := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)) is not None:
            words, known = [m.group(1)], re.findall(r"'([^']*)'", m.group(2))
        else:
            return ""
        for word in words:
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}? ({self.prog} --help lists them all)"
        return f" ({self.prog} --help lists the options)" if words else ""


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
    dtype: str | torch.dtype = option(
        "auto", "weight/activation dtype: auto (the checkpoint's: bfloat16 for the built-in models; bfloat16 for a "
                "quantized GGUF or a float16 checkpoint on cpu), float32, bfloat16, float16 (also fp32, bf16, fp16)",
        choices=list(DTYPE_CHOICES))
    device: str = option("auto", "where the model, KV cache and sampling run: cpu, cuda, or auto (cuda when "
                                 "torch.cuda.is_available() and there are at least --tensor-parallel-size GPUs, "
                                 "else cpu)", choices=list(DEVICES))
    seed: int = option(0, "seed for sampling requests that set none", type=int)
    num_threads: int | None = option(None, "torch intra-op threads (None: torch's default)", type=int)
    depth_stats: bool = option(False, "aggregate the AttnRes depth weights of every sampled token and export "
                                      "per-site means and entropies as metrics (costs a little per step)",
                               flags=["--depth-stats", "--depth-metrics"])
    kernels: str = option("auto", "op implementations: native (oneDNN linears on weights prepacked at load; "
                                  "C++ norms, AttnRes ops and paged decode attention, compiled once and cached), "
                                  "triton (Triton kernels for norms, AttnRes mixing and paged decode attention; "
                                  "CUDA, or CPU under TRITON_INTERPRET=1), reference (plain PyTorch) or auto "
                                  "(triton on a CUDA device, else native where its ops work on this machine; "
                                  "the reference with a warning when they do not)", choices=list(BACKENDS))
    quantization: str = option(
        "auto", "weights served in a quantized block format, computed without dequantizing the whole matrix: "
                "auto (a GGUF file's Q8_0/Q4_0/Q4_1 tensors as stored, other types dequantized to --dtype; a float "
                "checkpoint in --dtype), none (everything dequantized to --dtype), int8 (= q8_0), q8_0, q4_0, q4_1 "
                "(every linear, the embedding and the LM head quantized at load)", choices=list(QUANTIZATION_CHOICES))
    quant_activations: str = option(
        "none", "activations of the quantized linears: none (weight-only: never rounded, fp32 products) or int8 "
                "(steps of more than 8 rows, prompt chunks and batched decode, round them to int8 blocks for the "
                "integer dot products of AVX-512 VNNI, as llama.cpp does for all its quantized dot products: about "
                "2.5x faster linears at 32 rows, perplexity +0.3-0.6%%; smaller steps stay weight-only)",
        choices=list(QUANT_ACTIVATIONS))
    small_step_rows: int | None = option(
        None, "CPU: pure-decode steps of at most this many rows run on one thread, leaving the other cores to the "
              "HTTP server's event loop and response streams (measured at 1 stream on 2 cores: 5.2 ms per token "
              "against 8.7 with both threads); None: 2 under `serve`, 0 offline", type=int)
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
    kv_cache_memory: str | int | None = option(
        None, "bytes for the paged KV cache (all layers, this rank), e.g. 512MiB (None: 1GiB on cpu; on cuda, "
              "what --gpu-memory-utilization leaves)")
    depth_cache_memory: str | int = option("256MiB", "bytes for the per-step AttnRes depth pool, e.g. 256MiB")
    num_kv_blocks: int | None = option(None, "number of KV blocks, overriding the --kv-cache-memory budget",
                                       type=int)
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompt prefixes already computed",
                                         action=argparse.BooleanOptionalAction)
    gpu_memory_utilization: float = option(
        0.9, "cuda: the fraction of the GPU's memory this engine may use; after loading the weights a profile "
             "step of --max-num-batched-tokens tokens measures the peak, and the KV cache gets the rest "
             "(unless --kv-cache-memory or --num-kv-blocks is given). Accepted and ignored on cpu, where the "
             "byte budgets apply", type=float)
    # CUDA graphs
    enforce_eager: bool = option(False, "cuda: never capture CUDA graphs (decode steps run eagerly like every "
                                        "other step)")
    max_cuda_graph_batch_size: int | None = option(
        None, "cuda: the largest decode batch captured as a CUDA graph (sizes 1, 2, 4, 8, then steps of 8; "
              "larger decode batches run eagerly; None: min(max_num_seqs, 256))", type=int)
    # speculative decoding
    speculative_config: dict[str, Any] | str | None = option(
        None, 'speculative decoding as a JSON object, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
              '"prompt_lookup_min": 2, "prompt_lookup_max": 4}\': drafts from each request\'s own prompt and '
              'output, verified in one forward (greedy output unchanged; sampled output distribution unchanged); '
              'or \'{"method": "depth", "num_speculative_tokens": 2, "exit_block": 1}\': drafts from the first '
              'exit_block blocks of a Block AttnRes model and its output head (early-exit self-speculation)')
    # parallel
    tensor_parallel_size: int = option(1, "tensor-parallel ranks (processes the model is sharded over; over "
                                          "NCCL, one GPU each, on cuda, over gloo on cpu)", type=int)

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
        tp = self.tensor_parallel_size if isinstance(self.tensor_parallel_size, int) else 1
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() and tp <= max(1, torch.cuda.device_count()) else "cpu"
        if self.device == "cuda":
            if not torch.cuda.is_available():
                errors.append("device='cuda' but torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                              "build): install a CUDA build of torch or use device='cpu' (--device)")
            elif tp > 1 and tp > (gpus := torch.cuda.device_count()):
                errors.append(f"device='cuda' with tensor_parallel_size={tp} needs {tp} GPUs (one per rank), but "
                              f"{gpus} {'is' if gpus == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES): lower "
                              "--tensor-parallel-size, or use device='cpu' for gloo tensor parallelism "
                              "(--device, --tensor-parallel-size)")
        return self.device

    def _speculative(self, errors: list[str]) -> SpeculativeConfig | None:
        """--speculative-config: a JSON string (the CLI) or a dict (LLM(...)); None or {} is off."""
        value = self.speculative_config
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                errors.append(f"speculative_config is not valid JSON ({e}) (--speculative-config)")
                return None
        if value is None or value == {}:
            return None
        try:
            return SpeculativeConfig.from_dict(value)
        except (ValueError, TypeError) as e:
            errors.append(f"{e} (--speculative-config)")
            return None

    def create_engine_config(self) -> EngineConfig:
        """Validate every option (ValueError naming the field and flag, all problems in one message)."""
        errors: list[str] = []
        if not isinstance(self.model, str) or not self.model:
            errors.append(f"model must be a non-empty path or name, got {self.model!r} (--model)")
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError:
            errors.append(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r} (--dtype)")
            dtype = torch.float32
        device = self._device(errors)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            errors.append(f"seed must be an integer, got {self.seed!r} (--seed)")
        _at_least(errors, "num_threads", self.num_threads, 1, optional=True)
        _at_least(errors, "small_step_rows", self.small_step_rows, 0, optional=True)
        _at_least(errors, "max_model_len", self.max_model_len, 2, optional=True)
        _at_least(errors, "max_num_seqs", self.max_num_seqs, 1)
        _at_least(errors, "max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _at_least(errors, "long_prefill_token_threshold", self.long_prefill_token_threshold, 0)
        _at_least(errors, "block_size", self.block_size, 1)
        kv_bytes = None if self.kv_cache_memory is None else _size(errors, "kv_cache_memory", self.kv_cache_memory)
        depth_bytes = _size(errors, "depth_cache_memory", self.depth_cache_memory)
        _at_least(errors, "num_kv_blocks", self.num_kv_blocks, 1, optional=True)
        _at_least(errors, "tensor_parallel_size", self.tensor_parallel_size, 1)
        _at_least(errors, "max_cuda_graph_batch_size", self.max_cuda_graph_batch_size, 1, optional=True)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, int | float) or not 0.0 < u <= 1.0:
            errors.append(f"gpu_memory_utilization must be a fraction in (0, 1], got {u!r} "
                          "(--gpu-memory-utilization)")
        for name in ("enable_prefix_caching", "depth_stats", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kernels not in BACKENDS:
            errors.append(f"kernels must be one of {', '.join(BACKENDS)}; got {self.kernels!r} (--kernels)")
        if self.quant_activations not in QUANT_ACTIVATIONS:
            errors.append(f"quant_activations must be one of {', '.join(QUANT_ACTIVATIONS)}; "
                          f"got {self.quant_activations!r} (--quant-activations)")
        try:
            check_quantization(self.quantization)
        except ValueError as e:
            errors.append(f"{e} (--quantization)")
        spec = self._speculative(errors)
        if errors:
            raise ValueError("; ".join(errors))
        return EngineConfig(
            speculative=spec,
            model=self.model, dtype=dtype, seed=self.seed, num_threads=self.num_threads,
            depth_stats=self.depth_stats, device=device, kernels=self.kernels, enforce_eager=self.enforce_eager,
            quantization=str(self.quantization), quant_activations=str(self.quant_activations),
            small_step_rows=self.small_step_rows,
            max_cuda_graph_batch_size=self.max_cuda_graph_batch_size,
            cache=CacheConfig(block_size=self.block_size, kv_cache_memory=kv_bytes, depth_cache_memory=depth_bytes,
                              enable_prefix_caching=self.enable_prefix_caching, num_kv_blocks=self.num_kv_blocks,
                              gpu_memory_utilization=float(u)),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len,
                                      long_prefill_token_threshold=self.long_prefill_token_threshold),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size))
