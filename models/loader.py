"""Checkpoint folders -> ModelConfig, Tokenizer and a loaded LlamaForServing.

A model is a Hugging Face style folder (config.json, model.safetensors or a sharded index,
tokenizer.model or tokenizer.json) or the name of a built-in model shipped in models/builtin/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from models.config import ModelConfig
from models.context import Communicator
from models.llama import LlamaForServing

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
DEFAULT_MODEL = "shakespeare-attnres"


def builtin_models() -> list[str]:
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists())


def resolve_model(name_or_path: str | Path) -> Path:
    """A folder path, or a built-in model name -> the checkpoint folder. Raises FileNotFoundError."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: is it a Hugging Face style model folder?")
        return p
    if (BUILTIN_DIR / str(name_or_path) / "config.json").exists():
        return BUILTIN_DIR / str(name_or_path)
    known = ", ".join(builtin_models()) or "none installed"
    raise FileNotFoundError(f"model {str(name_or_path)!r} is neither a folder nor a built-in model ({known})")


def load_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        return ModelConfig.from_json_file(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


class _SafetensorsSlice:
    def __init__(self, handle, name: str) -> None:  # type: ignore[no-untyped-def]
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        if rows is None and cols is None:
            return self._slice[:]
        if cols is None:
            return self._slice[rows]
        return self._slice[rows if rows is not None else slice(None), cols]


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"checkpoint shard {f} listed in the index is missing")
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, _SafetensorsSlice]]:
    """Yield (name, lazily readable slice): a rank reads only the rows/columns of its shard."""
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, _SafetensorsSlice(handle, name)


def load_model(folder: Path, dtype: torch.dtype, comm: Communicator | None = None,
               cfg: ModelConfig | None = None) -> LlamaForServing:
    cfg = cfg or load_config(folder)
    with torch.device("cpu"):
        model = LlamaForServing(cfg, dtype=dtype, comm=comm)
    model.load_weights(iter_safetensors(folder))
    return model.eval()
