"""ModelConfig: the parsed config.json of a Llama-family checkpoint, standard or AttnRes.

Kept free of I/O beyond `from_json_file` so tests and the trainer can build configs in code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

AttnResMode = Literal["none", "block", "full"]

STANDARD_ARCH = "LlamaForCausalLM"
ATTNRES_ARCH = "AttnResLlamaForCausalLM"
SUPPORTED_ARCHS = (STANDARD_ARCH, ATTNRES_ARCH)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of one decoder. `attn_res_mode="none"` is the standard PreNorm residual."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attn_res_mode: AttnResMode = "none"
    attn_res_block_size: int = 0  # transformer layers per block (block mode)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for a config that cannot describe a working model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config.json: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.attn_res_mode not in ("none", "block", "full"):
            raise ValueError(f"config.json: attn_res_mode must be 'block' or 'full', got {self.attn_res_mode!r}")
        if self.attn_res_mode == "block" and not 1 <= self.attn_res_block_size <= self.num_hidden_layers:
            raise ValueError(
                f"config.json: attn_res_block_size must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.attn_res_block_size}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"config.json: rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_attn_res(self) -> bool:
        return self.attn_res_mode != "none"

    @property
    def num_depth_blocks(self) -> int:
        """N: completed block representations a token can carry (embedding included)."""
        if self.attn_res_mode == "block":
            return math.ceil(self.num_hidden_layers / self.attn_res_block_size)
        if self.attn_res_mode == "full":
            return 2 * self.num_hidden_layers
        return 0

    @property
    def num_depth_sources(self) -> int:
        """Values held per token by the depth cache: N completed blocks + the partial sum (or L+1 sources)."""
        if self.attn_res_mode == "block":
            return self.num_depth_blocks + 1
        if self.attn_res_mode == "full":
            return 2 * self.num_hidden_layers + 1
        return 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(int(t) for t in self.eos_token_id)

    @property
    def architecture(self) -> str:
        return ATTNRES_ARCH if self.is_attn_res else STANDARD_ARCH

    # ---- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict; unknown keys are ignored."""
        archs = d.get("architectures") or [STANDARD_ARCH]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"config.json: unsupported architecture {arch!r}; depthserve serves {', '.join(SUPPORTED_ARCHS)}")
        mode: str = "none"
        if arch == ATTNRES_ARCH:
            mode = d.get("attn_res_mode", "block")
        scaling = d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"config.json: rope_scaling {scaling!r} is not supported yet")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["attn_res_mode"] = mode
        kw.setdefault("num_key_value_heads", d.get("num_attention_heads", 1))
        if kw.get("head_dim") is None:
            kw["head_dim"] = 0
        if mode == "block":
            kw.setdefault("attn_res_block_size", 0)
            if not kw["attn_res_block_size"]:
                raise ValueError("config.json: attn_res_mode 'block' needs attn_res_block_size")
        try:
            return cls(**kw)
        except TypeError as e:  # a missing required field
            raise ValueError(f"config.json: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        mode = d.pop("attn_res_mode")
        d["architectures"] = [self.architecture]
        d["model_type"] = "attnres_llama" if self.is_attn_res else "llama"
        d["hidden_act"] = "silu"
        if self.is_attn_res:
            d["attn_res_mode"] = mode
        else:
            d.pop("attn_res_block_size")
        return d
