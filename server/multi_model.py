"""`depthserve serve --model A --model B ...`: one engine per model, the memory budgets shared between them.

Each model gets its own LLMEngine (weights, KV cache, depth pool, scheduler, engine thread), so the models
never wait for each other's memory and each answers exactly as it would alone. The engine options are the
same for every model, except the budgets:

- `--kv-cache-memory` and `--depth-cache-memory` are totals, split evenly (`1GiB` over two models is
  512 MiB each); a comma list (`600MiB,400MiB`) gives each model its own, in `--model` order. On the CPU
  without `--kv-cache-memory`, the default 1 GiB is the total. On CUDA without it, each engine takes an
  even share of `--gpu-memory-utilization`: the i-th of N profiles with `u * i / N`, and since its profile
  counts everything the engines before it hold, its own weights, activations and KV cache get `u / N`.
- `--num-kv-blocks` applies to each model.

Served names come from `--served-model-name` (one per `--model`, same order), else the folder's (or
built-in model's, or .gguf file's) name.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.arg_utils import EngineArgs
from engine.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig, parse_bytes

__all__ = ["ServedModelPlan", "allow_several_models", "default_name", "describe", "plan_models", "startup_error"]


class _ModelOption(argparse.Action):
    """--model as before (the last one given), and every one given, in order, in `models`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.models = [*(getattr(namespace, "models", None) or []), values]


def allow_several_models(parser: argparse.ArgumentParser) -> None:
    """Let `--model` (EngineArgs' flag) be given several times; the list lands in `ns.models`."""
    parser.set_defaults(models=None)
    for action in parser._actions:  # noqa: SLF001 - argparse keeps no public handle on an added option
        if action.dest == "model" and action.option_strings:
            action.__class__ = _ModelOption
            action.help = (action.help or "") + "; give it several times to serve several models, each with " \
                "its own engine (budgets split between them)"


def default_name(model: str) -> str:
    """A model's served name when none is given: its folder's (or file's) name without where it lives."""
    p = Path(model.rstrip("/\\"))
    return p.stem if p.suffix.lower() == ".gguf" else p.name


@dataclass(frozen=True)
class ServedModelPlan:
    name: str
    config: EngineConfig


def _budgets(value: str | int | None, n: int, flag: str) -> list[int] | None:
    """A total split evenly over n models, or a comma list with one size per model; None stays None."""
    if value is None:
        return None
    parts = str(value).split(",") if isinstance(value, str) else [value]
    try:
        sizes = [parse_bytes(p.strip() if isinstance(p, str) else p) for p in parts]
    except (ValueError, TypeError):
        raise ValueError(f"{flag}: cannot read {value!r} as a size, or one size per model separated by commas "
                         "(e.g. 1GiB, or 600MiB,400MiB)") from None
    if len(sizes) == 1:
        return [sizes[0] // n] * n
    if len(sizes) != n:
        raise ValueError(f"{flag}: {len(sizes)} sizes for {n} models: give one total (split evenly) or one "
                         "size per --model")
    return sizes


def plan_models(args: EngineArgs, models: Sequence[str], names: Sequence[str] | None = None) -> list[ServedModelPlan]:
    """One EngineConfig per model with its share of the budgets, and its served name (ValueError: what to fix)."""
    n = len(models)
    if n == 0:
        raise ValueError("no model given (--model)")
    if names and len(names) != n:
        raise ValueError(f"--served-model-name: {len(names)} names for {n} models: give one name per --model, "
                         "in the same order")
    served = list(names) if names else [default_name(m) for m in models]
    dup = next((x for x in served if served.count(x) > 1), None)
    if dup is not None:
        raise ValueError(f"two models would be served as {dup!r}: give each its own name with "
                         f"--served-model-name (one per --model)")
    kv = _budgets(args.kv_cache_memory, n, "--kv-cache-memory")
    depth = _budgets(args.depth_cache_memory, n, "--depth-cache-memory")
    assert depth is not None  # it has a default
    device = dataclasses.replace(args, model=models[0], kv_cache_memory=None, depth_cache_memory=1) \
        .create_engine_config().device
    profiled = kv is None and args.num_kv_blocks is None and device == "cuda"
    if kv is None and not profiled:
        kv = [DEFAULT_KV_CACHE_MEMORY // n] * n
    plans = []
    for i, (model, name) in enumerate(zip(models, served, strict=True)):
        util = args.gpu_memory_utilization * (i + 1) / n if profiled else args.gpu_memory_utilization
        one = dataclasses.replace(args, model=model, kv_cache_memory=None if kv is None else kv[i],
                                  depth_cache_memory=depth[i], gpu_memory_utilization=util)
        try:
            plans.append(ServedModelPlan(name, one.create_engine_config()))
        except ValueError as e:
            raise ValueError(f"model {name}: {e}") from None
    return plans


def startup_error(plan: ServedModelPlan, n: int, error: Exception) -> ValueError:
    """A model's start-up failure, named, with the budgets' meaning when a budget is what failed."""
    message = f"model {plan.name}: {error}"
    if "-cache-memory" in message:
        message += (f" (with {n} models --kv-cache-memory and --depth-cache-memory are totals, split evenly; "
                    "a comma list such as 600MiB,400MiB gives each model its own)")
    return ValueError(message)


def describe(plans: Sequence[ServedModelPlan]) -> str:
    """One line per model's budgets, for the start-up log."""
    mib = 2**20
    lines = []
    for p in plans:
        cc = p.config.cache
        kv = (f"{cc.num_kv_blocks} KV blocks" if cc.num_kv_blocks else
              f"KV {cc.kv_cache_memory / mib:.0f} MiB" if cc.kv_cache_memory is not None else
              f"KV from --gpu-memory-utilization {cc.gpu_memory_utilization:.3f} (cumulative)")
        lines.append(f"{p.name} ({p.config.model}): {kv}, depth pool up to {cc.depth_cache_memory / mib:.0f} MiB")
    return "; ".join(lines)
