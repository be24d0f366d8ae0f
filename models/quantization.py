"""Which weights a model serves quantized, in which block format, and how they are loaded.

    plan = quant_plan(model, "auto", stored_types)   # before load_weights
    apply_plan(model, plan)                           # quantized parameters + loaders
    model.load_weights(...)                           # GGUF blocks copied as stored, float tensors quantized

`--quantization` (vLLM's flag):
- `auto` (default): a GGUF file's linears and embedding stay in their stored format where a native kernel
  exists for it (Q8_0, Q4_0, Q4_1: kernels/quant.py); any other type (F16, Q6_K, ...) is dequantized to --dtype
  as before. A float checkpoint is served in --dtype.
- `none`: every weight dequantized to --dtype (the behaviour before quantized kernels).
- `int8` (= `q8_0`), `q4_0`, `q4_1`: every linear, the embedding and the LM head quantized to that format at
  load (from the checkpoint's values; a GGUF tensor already in that format is copied as is).

A weight stays in --dtype when its (per-rank) input size is not a multiple of 32, or, under auto, when the
checkpoint tensors merged into it (q/k/v, gate/up) are not all stored in one supported format; the plan says why
(logged once at start-up). Norms and the AttnRes gains and queries are never quantized: the depth mixing stays in
fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from kernels import quant
from kernels.quant import QuantFormat
from models.parallel_plan import TensorSource, as_source

QUANTIZATION_CHOICES = ("auto", "none", "int8", *quant.FORMATS)
QUANT_ACTIVATIONS = ("int8", "none")  # --quant-activations: see kernels.ops.pack_linear

# the parameters of the modules that read their weight through a linear or an embedding lookup
_QUANTIZABLE = (".qkv_proj.weight", ".o_proj.weight", ".gate_up_proj.weight", ".down_proj.weight",
                "embed_tokens.weight", "lm_head.weight")


def check_quantization(name: str) -> str:
    """The canonical --quantization value; ValueError naming the choices."""
    key = str(name).lower()
    if key not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {name!r}")
    return key if key in ("auto", "none") else quant.format_named(key).name  # int8 -> q8_0 (one alias table)


@dataclass(frozen=True)
class QuantPlan:
    """Parameter name -> format for the weights served quantized; `kept` says why others stay in --dtype."""

    formats: Mapping[str, QuantFormat] = field(default_factory=dict)
    kept: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the start-up log: how many weights per format, and why any stayed in float."""
        if not self.formats and not self.kept:
            return "none"
        counts: dict[str, int] = {}
        for fmt in self.formats.values():
            counts[fmt.name] = counts.get(fmt.name, 0) + 1
        parts = [f"{n} {name}" for name, n in sorted(counts.items())]
        if self.kept:
            reasons = sorted(set(self.kept.values()))
            parts.append(f"{len(self.kept)} kept in float ({'; '.join(reasons)})")
        return ", ".join(parts)


def quant_plan(model: nn.Module, requested: str, stored: Mapping[str, int | None]) -> QuantPlan:
    """The plan for `model` (LlamaForServing, built but not loaded) under `requested` (check_quantization's
    value); `stored`: checkpoint tensor name -> its ggml type id, None for a float tensor (safetensors: all)."""
    requested = check_quantization(requested)
    if requested == "none":
        return QuantPlan()
    parts: dict[str, list[str]] = {}
    for name in model.expected_tensor_names():  # type: ignore[operator]
        pname = model.param_for(name)[0]  # type: ignore[operator]
        if pname.endswith(_QUANTIZABLE):
            parts.setdefault(pname, []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    formats: dict[str, QuantFormat] = {}
    kept: dict[str, str] = {}
    for pname, names in parts.items():
        if pname not in params:
            continue
        k = params[pname].shape[1]
        if requested == "auto":
            types = {stored.get(n) for n in names}
            if types == {None}:
                continue  # a float tensor: served in --dtype, nothing to say
            fmt = quant.BY_GGML_TYPE.get(next(iter(types))) if len(types) == 1 else None  # type: ignore[arg-type]
            if fmt is None:
                kept[pname] = ("its parts are stored in different types" if len(types) > 1
                               else "its stored type has no native kernel")
                continue
        else:
            fmt = quant.format_named(requested)
        if k % quant.BLOCK:
            kept[pname] = f"an input size per rank that is not a multiple of {quant.BLOCK}"
            continue
        formats[pname] = fmt
    return QuantPlan(formats, kept)


def apply_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Replace each planned weight by an empty uint8 parameter of its quantized shape whose loader quantizes
    (or copies GGUF blocks) into it; the module records its format in `.quant`. Before load_weights."""
    for pname, fmt in plan.formats.items():
        module = model.get_submodule(pname.rsplit(".", 1)[0])
        if getattr(module, "quant", None) is not None:
            continue  # the tied lm_head: the embedding's module, already done
        old = module.weight
        n, k = old.shape
        param = nn.Parameter(torch.zeros(quant.quantized_shape(n, k, fmt), dtype=torch.uint8), requires_grad=False)
        param.weight_loader = functools.partial(_load_quantized, module.weight_loader, fmt)  # type: ignore[attr-defined]
        module.weight = param
        module.quant = fmt
    if hasattr(model, "_params"):
        del model._params  # the loader's name -> parameter cache, built from the old parameters


def _load_quantized(loader: Callable[..., None], fmt: QuantFormat, param: torch.Tensor,
                    loaded: TensorSource | torch.Tensor, shard_id: Hashable = None) -> None:
    """The module's own loader (which picks this rank's rows and columns) reading quantized rows."""
    loader(param, QuantizedSource(as_source(loaded), fmt), shard_id)


class QuantizedSource:
    """A TensorSource whose reads return quantized rows (uint8 [rows, cols / 32 * block_bytes]): the stored
    blocks of a GGUF tensor already in `fmt` (`read_quantized`), else the float rows quantized."""

    def __init__(self, src: TensorSource, fmt: QuantFormat) -> None:
        self.src = src
        self.fmt = fmt
        self.shape = src.shape

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if cols is not None and (cols.start % quant.BLOCK or cols.stop % quant.BLOCK):
            raise ValueError(f"columns {cols.start}:{cols.stop} do not cover whole {self.fmt.name} blocks")
        stored = getattr(self.src, "read_quantized", None)
        if stored is not None and (q := stored(self.fmt, rows, cols)) is not None:
            return q
        return quant.quantize(self.src.read(rows, cols), self.fmt)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters take (quantized ones at their packed size), each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def int8_copy_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights' copies repacked for the int8-activation kernel (--quant-activations int8)."""
    packs = {id(pw.int8): pw.int8 for m in model.modules()
             if (pw := getattr(m, "packed", None)) is not None and getattr(pw, "int8", None) is not None}
    return sum(w.nbytes for w in packs.values())
