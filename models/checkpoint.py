"""Write a Hugging Face style checkpoint folder (config.json + model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import ModelConfig

# docs/attnres.md §7: the AttnRes query/norm tensors stay fp32 whatever the checkpoint dtype.
FP32_SUFFIXES = ("_res_norm.weight", "_res_proj.weight")


def is_fp32_tensor(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


def save_checkpoint(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, folder: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save `state_dict` (checkpoint names) and `cfg` into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state_dict.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        tensors[name] = (t.float() if is_fp32_tensor(name) else t.to(dtype)).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return folder
