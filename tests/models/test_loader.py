"""Clear errors for broken checkpoint folders; sharded checkpoints load like single files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loader import load_model, resolve_model
from tests.tiny import tiny_config, write_tiny


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "m", tiny_config("block", 2, layers=3))[0]


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a folder nor a built-in"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path / "empty")


def test_missing_weights_file(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(folder, torch.float32)


def test_unknown_architecture(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'MixtralForCausalLM'"):
        load_model(folder, torch.float32)


def test_missing_and_misshaped_tensor_are_named(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp_res_proj.weight"
    broken = dict(tensors)
    del broken[name]
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_model(folder, torch.float32)
    broken = dict(tensors)
    broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(broken, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \[3, 3\], expected \[32, 64\]"):
        load_model(folder, torch.float32)


def test_sharded_checkpoint_loads(folder: Path, tmp_path: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / fname)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(folder, torch.float32)
    torch.testing.assert_close(model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
