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

# Bounds past which a value is corrupt or hostile metadata, not a model (published checkpoints stay
# orders of magnitude below): rejected before anything is sized from them.
MAX_SIZE = 2**31 - 1  # vocab_size, hidden_size, intermediate_size, max_position_embeddings
MAX_COUNT = 2**16  # layers, heads, head_dim
INT_LIMITS = {
    "vocab_size": MAX_SIZE, "hidden_size": MAX_SIZE, "intermediate_size": MAX_SIZE,
    "num_hidden_layers": MAX_COUNT, "num_attention_heads": MAX_COUNT, "num_key_value_heads": MAX_COUNT,
    "head_dim": MAX_COUNT, "max_position_embeddings": MAX_SIZE,
}


def check_int(where: str, name: str, value: Any, lo: int = 1, hi: int = MAX_SIZE) -> int:
    """`value` if it is an int (not a bool, float or string) in [lo, hi]; else ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{where}: {name} must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{where}: {name} must be <= {hi}, got {value}")
    return value


def check_positive_float(where: str, name: str, value: Any) -> float:
    """`value` if it is a finite real number > 0; else ValueError naming `name` (NaN passes `<= 0` checks)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value}")
    return float(value)


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
        if self.head_dim == 0 and not isinstance(self.head_dim, bool):
            hidden = check_int("config.json", "hidden_size", self.hidden_size)
            heads = check_int("config.json", "num_attention_heads", self.num_attention_heads, hi=MAX_COUNT)
            if hidden % heads:
                raise ValueError(f"config.json: hidden_size ({hidden}) must be divisible by num_attention_heads "
                                 f"({heads}) when head_dim is not given")
            object.__setattr__(self, "head_dim", hidden // heads)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for a config that cannot describe a working model.

        Types are checked too: a config.json may hold strings, bools or floats where ints belong.
        """
        where = "config.json"
        for name, hi in INT_LIMITS.items():
            check_int(where, name, getattr(self, name), hi=hi)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim must be even (rotary rotates halves), got {self.head_dim}")
        if not isinstance(self.attn_res_mode, str) or self.attn_res_mode not in ("none", "block", "full"):
            raise ValueError(f"config.json: attn_res_mode must be 'block' or 'full', got {self.attn_res_mode!r}")
        if self.attn_res_mode == "block":
            check_int(where, "attn_res_block_size", self.attn_res_block_size, hi=self.num_hidden_layers)
        check_positive_float(where, "rms_norm_eps", self.rms_norm_eps)
        check_positive_float(where, "rope_theta", self.rope_theta)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"config.json: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.bos_token_id is not None:
            check_int(where, "bos_token_id", self.bos_token_id, lo=0)
        eos = self.eos_token_id
        for t in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            check_int(where, "eos_token_id", t, lo=0)

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
        if not isinstance(d, dict):
            raise ValueError(f"config.json: must be a JSON object, got {type(d).__name__}")
        archs = d.get("architectures") or [STANDARD_ARCH]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config.json: architectures must be a list of strings, got {archs!r}")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"config.json: unsupported architecture {arch!r}; depthserve serves {', '.join(SUPPORTED_ARCHS)}")
        mode: str = "none"
        if arch == ATTNRES_ARCH:
            mode = d.get("attn_res_mode", "block")
        scaling = d.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
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
        """Parse a config.json; ValueError (naming the file) for one that is not JSON."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: [[[[...
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

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
