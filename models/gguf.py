"""GGUF checkpoints (llama.cpp's single-file format) -> ModelConfig, LlamaForServing and Tokenizer.

Many small pretrained models are published only as GGUF, so depthserve reads them directly:
metadata becomes a ModelConfig, tensors are renamed to Hugging Face Llama names and dequantized
(Q4_0, Q4_1, Q8_0, F16, BF16, F32, and whatever else `gguf.quants` knows) to the serving dtype at
load time: there are no quantized kernels here, the file is just a compact way to ship weights.

Two llama.cpp conventions are undone on the way in:
- GGUF lists tensor dims fastest-first (ne0 = columns), the reverse of torch's order;
- llama.cpp's converter interleaves the two rotary halves of every Q/K head (its rotary pairs
  adjacent rows); we apply the inverse so the Hugging Face half-rotation rotary is right.

The tokenizer is rebuilt from metadata too: "gpt2" (byte-level BPE: tokens + merges) as a
`tokenizers` BPE, "llama" (sentencepiece: tokens + scores + types) as a sentencepiece model proto.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels.quant import BLOCK, QuantFormat
from models.config import MAX_COUNT, MAX_SIZE, ModelConfig, check_int, check_positive_float
from models.context import Communicator
from models.llama import LlamaForServing, check_tensor_shapes
from models.tokenizer import Tokenizer

SUPPORTED_GGUF_ARCHS = ("llama",)

# llama.cpp tensor names -> Hugging Face Llama names ({i}: the layer index).
GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp splits text before BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}
# GPT-2 regex after splitting every digit on its own (StarCoder lineage, SmolLM included).
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}

# ggml token types (also sentencepiece's piece types, same numbering).
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


# ---- reading ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    from gguf import GGUFReader

    return GGUFReader(path)


def open_gguf(path: str | Path) -> Any:
    """A GGUFReader (memory-mapped). Cached: config, tokenizer and weights each need it, and
    parsing a 50K-token vocabulary's metadata takes a couple of seconds."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install 'gguf>=0.13'") from None
    p = Path(path).resolve()
    st = p.stat()
    try:
        return _open(str(p), st.st_mtime_ns, st.st_size)
    except (ValueError, struct.error, IndexError, KeyError, OverflowError) as e:  # what GGUFReader raises on
        # a truncated or corrupt file: short reads index past the end, bad counts overflow, names repeat
        raise ValueError(f"{p.name} is not a readable GGUF file (truncated or corrupt): {e}") from None


def _field_value(field: Any) -> Any:
    """Decode a ReaderField by hand (parts/data/types), which works across gguf versions."""
    from gguf import GGUFValueType

    def one(part: np.ndarray, typ: Any) -> Any:
        return bytes(part).decode("utf-8") if typ == GGUFValueType.STRING else part.tolist()[0]

    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    return one(field.parts[field.data[0]], types[0])


def gguf_metadata(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return _field_value(field)
    except (IndexError, ValueError) as e:  # an empty value, or bytes that are not UTF-8
        raise ValueError(f"GGUF metadata {key} cannot be decoded: {e}") from None


def _uniform(value: Any, key: str) -> Any:
    """Some files store per-layer arrays; our decoder needs every layer alike."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF {key} differs between layers ({value}); depthserve needs uniform layers")
        return value[0]
    return value


# ---- config -------------------------------------------------------------------------------------
# ModelConfig fields -> the GGUF metadata they come from ({arch} filled in), to name them in errors.
_GGUF_FIELDS = {
    "hidden_size": "{arch}.embedding_length", "intermediate_size": "{arch}.feed_forward_length",
    "num_hidden_layers": "{arch}.block_count", "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv", "head_dim": "{arch}.attention.key_length",
    "max_position_embeddings": "{arch}.context_length", "vocab_size": "vocab size (token_embd.weight rows)",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon", "rope_theta": "{arch}.rope.freq_base",
}
# Tensor types whose weights we can read: floats and what gguf.quants dequantizes (not I8..I64, F64).
_FLOAT_TYPES = ("F32", "F16")


def _readable_type(tensor_type: Any) -> bool:
    from gguf import quants

    traits = getattr(quants, "_type_traits", None)
    return tensor_type.name in _FLOAT_TYPES or traits is None or tensor_type in traits


def gguf_tensor_shapes(r: Any, where: str) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> torch-order shape from the tensor infos, without reading data; ValueError
    for a tensor we cannot map or read."""
    shapes: dict[str, tuple[int, ...]] = {}
    for t in r.tensors:
        try:
            name = hf_name(t.name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not _readable_type(t.tensor_type):
            raise ValueError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which depthserve cannot load")
        shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))
    return shapes


def gguf_config(path: str | Path) -> ModelConfig:
    """ModelConfig from GGUF metadata, checked against the tensor infos before anything is allocated.

    Raises one-line ValueError naming the metadata key or tensor for architectures or features we lack
    and for metadata that is missing, of the wrong type, absurd, or inconsistent with the tensors.
    """
    where = Path(path).name
    r = open_gguf(path)
    arch = gguf_metadata(r, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported; depthserve loads "
                         f"{', '.join(SUPPORTED_GGUF_ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        v = gguf_metadata(r, f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"{where}: GGUF metadata lacks {arch}.{key}")
        try:
            return _uniform(v, f"{arch}.{key}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def get_int(key: str, default: Any = None, hi: int = MAX_SIZE) -> int:
        return check_int(where, f"{arch}.{key}", get(key, default), hi=hi)

    def get_float(key: str, default: float) -> float:
        return check_positive_float(where, f"{arch}.{key}", get(key, default))

    hidden = get_int("embedding_length")
    heads = get_int("attention.head_count", hi=MAX_COUNT)
    kv_heads = get_int("attention.head_count_kv", heads, hi=MAX_COUNT)
    if heads % kv_heads:
        raise ValueError(f"{where}: {arch}.attention.head_count ({heads}) must be a multiple of "
                         f"{arch}.attention.head_count_kv ({kv_heads})")
    if gguf_metadata(r, f"{arch}.attention.key_length") is None and hidden % heads:
        raise ValueError(f"{where}: {arch}.embedding_length ({hidden}) must be divisible by "
                         f"{arch}.attention.head_count ({heads}) when {arch}.attention.key_length is not given")
    head_dim = get_int("attention.key_length", hidden // heads, hi=MAX_COUNT)
    rope_dim = get_int("rope.dimension_count", head_dim, hi=MAX_COUNT)
    if rope_dim != head_dim:
        raise ValueError(f"{where}: partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    scaling = gguf_metadata(r, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") and get_float("rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"{where}: rope scaling {scaling!r} is not supported yet")
    if any(t.name == "rope_freqs.weight" for t in r.tensors):
        raise ValueError(f"{where}: per-frequency rope scaling (rope_freqs, Llama 3.1 style) is not supported yet")
    shapes = gguf_tensor_shapes(r, where)
    embd = shapes.get("model.embed_tokens.weight")
    if embd is None:
        raise ValueError(f"{where}: GGUF has no token_embd.weight")
    if len(embd) != 2:
        raise ValueError(f"{where}: token_embd.weight has shape {list(embd)}, expected [vocab, {hidden}]")
    vocab = check_int(where, "vocab size (token_embd.weight rows)", embd[0])
    bos = gguf_metadata(r, "tokenizer.ggml.bos_token_id")
    eos_ids = [t for k in ("eos_token_id", "eot_token_id")
               if (t := gguf_metadata(r, f"tokenizer.ggml.{k}")) is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    kw = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get_int("feed_forward_length"),
        num_hidden_layers=get_int("block_count", hi=MAX_COUNT), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=get_float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get_float("rope.freq_base", 10000.0),
        max_position_embeddings=get_int("context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in shapes,
        bos_token_id=bos,
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
    )
    try:
        cfg = ModelConfig(**kw)  # type: ignore[arg-type]
    except ValueError as e:  # its messages name config.json fields: name the GGUF keys instead
        msg = str(e).removeprefix("config.json: ")
        for field, key in _GGUF_FIELDS.items():
            msg = msg.replace(field, key.format(arch=arch))
        msg = msg.replace("bos_token_id", "tokenizer.ggml.bos_token_id")
        msg = msg.replace("eos_token_id", "tokenizer.ggml.eos_token_id")
        raise ValueError(f"{where}: {msg}") from None
    check_gguf_tensors(cfg, shapes, where, arch)
    return cfg


def check_gguf_tensors(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str, arch: str) -> None:
    """ValueError (naming the GGUF key or tensor) unless the file's tensor infos match `cfg`."""
    check_tensor_shapes(cfg, shapes, where, field_label=lambda f: _GGUF_FIELDS.get(f, f).format(arch=arch),
                        tensor_label=gguf_name)


# ---- weights ------------------------------------------------------------------------------------
def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face Llama name; ValueError for one we cannot serve."""
    if gguf_name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[gguf_name]
    m = _BLK_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_TENSOR_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_TENSOR_NAMES[m.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a Llama decoder")


def gguf_name(name: str) -> str:
    """Hugging Face Llama name -> llama.cpp tensor name (for errors that name a GGUF file's tensors)."""
    inv = {v: k for k, v in GLOBAL_TENSOR_NAMES.items()}
    if name in inv:
        return inv[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    layer = {v: k for k, v in LAYER_TENSOR_NAMES.items()}
    return f"blk.{m.group(1)}.{layer[m.group(2)]}" if m and m.group(2) in layer else name


def unpermute_rotary(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K permutation: per head, rows (2j, 2j+1) go back to (j, j + hd/2)."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rotary(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q_proj/k_proj rows (for writing test files)."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFTensor:
    """A TensorSource over one GGUF tensor: dequantizes only the rows a rank asks for.

    Quantized rows are whole blocks, so slicing the raw [rows, bytes] array before
    dequantizing is exact; Q/K rows are un-permuted per head after.
    """

    def __init__(self, tensor: Any, rotary_head_dim: int | None = None) -> None:
        self._t = tensor
        self._rotary = rotary_head_dim
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        from gguf import dequantize

        data = self._t.data
        if rows is not None:
            data = data[rows]
        w = np.asarray(dequantize(data, self._t.tensor_type), dtype=np.float32)
        out = torch.from_numpy(w.copy() if not w.flags.writeable else w)
        if len(self.shape) == 2:
            out = out.reshape(-1, self.shape[1])
            if self._rotary is not None:
                if out.shape[0] % self._rotary:
                    raise ValueError(f"rows {rows} of {self._t.name} do not cover whole heads")
                out = unpermute_rotary(out, self._rotary)
        return out if cols is None else out[:, cols]

    @property
    def ggml_type(self) -> int:
        return int(self._t.tensor_type)

    def read_quantized(self, fmt: QuantFormat, rows: slice | None = None,
                       cols: slice | None = None) -> torch.Tensor | None:
        """The stored blocks of rows x cols (uint8 [rows, cols / 32 * block_bytes]) when the tensor is stored in
        `fmt`, else None. Row slices and the Q/K head un-permutation move whole rows, and a column slice on block
        boundaries moves whole blocks, so the bytes are the file's."""
        if self.ggml_type != fmt.ggml_type or len(self.shape) != 2:
            return None
        data = self._t.data if rows is None else self._t.data[rows]
        out = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(-1, self._t.data.shape[-1])
        if self._rotary is not None:
            if out.shape[0] % self._rotary:
                raise ValueError(f"rows {rows} of {self._t.name} do not cover whole heads")
            out = unpermute_rotary(out, self._rotary).contiguous()
        if cols is not None:
            out = out[:, cols.start // BLOCK * fmt.block_bytes:cols.stop // BLOCK * fmt.block_bytes]
        return out


def iter_gguf_tensors(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, GGUFTensor]]:
    """(Hugging Face name, lazily dequantized tensor) for every tensor in the file."""
    for t in open_gguf(path).tensors:
        name = hf_name(t.name)
        rotary = cfg.head_dim if name.endswith(("q_proj.weight", "k_proj.weight")) else None
        yield name, GGUFTensor(t, rotary)


def stored_types(path: str | Path) -> dict[str, int | None]:
    """Hugging Face tensor name -> its ggml type id, None for a float type (F32, F16, BF16)."""
    return {hf_name(t.name): None if t.tensor_type.name in ("F32", "F16", "BF16") else int(t.tensor_type)
            for t in open_gguf(path).tensors}


def load_gguf(path: str | Path, dtype: torch.dtype, comm: Communicator | None = None, cfg: ModelConfig | None = None,
              max_model_len: int | None = None,
              quantization: str = "auto") -> tuple[ModelConfig, LlamaForServing]:
    """Build the model of a GGUF file (this rank's shards only): weights in their stored block format where
    `quantization` (models/quantization.py) keeps them so, the rest dequantized to `dtype`; `max_model_len` sizes
    the rotary table (default: the file's context_length)."""
    if cfg is None:
        cfg = gguf_config(path)
    else:
        r, where = open_gguf(path), Path(path).name
        check_gguf_tensors(cfg, gguf_tensor_shapes(r, where), where, gguf_metadata(r, "general.architecture"))
    with torch.device("cpu"):
        model = LlamaForServing(cfg, dtype=dtype, comm=comm, max_positions=max_model_len)
    model.quantize(quantization, stored_types(path))
    model.load_weights(iter_gguf_tensors(path, cfg))
    return cfg, model.eval()


# ---- tokenizer ----------------------------------------------------------------------------------
def _bpe_backend(tokens: list[str], merges: list[str], types: list[int], pre: str | None) -> Any:
    """Byte-level BPE as llama.cpp runs it; control/user-defined tokens match whole, as llama.cpp does."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # "gpt2", "default" and the rest: GPT-2's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _pb_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_field(num: int, value: int | float | bytes) -> bytes:
    if isinstance(value, bytes):
        return _pb_varint(num << 3 | 2) + _pb_varint(len(value)) + value
    if isinstance(value, float):
        return _pb_varint(num << 3 | 5) + struct.pack("<f", value)
    return _pb_varint(num << 3) + _pb_varint(int(value))


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], unk_id: int | None,
                        bos_id: int | None, eos_id: int | None, add_space_prefix: bool) -> bytes:
    """A serialized sentencepiece ModelProto (BPE) equivalent to the one llama.cpp converted from.

    Written by hand (a handful of protobuf fields) so no protobuf dependency is needed.
    """
    pieces = b"".join(
        _pb_field(1, _pb_field(1, t.encode("utf-8")) + _pb_field(2, float(s)) + _pb_field(3, ty if 1 <= ty <= 6 else 1))
        for t, s, ty in zip(tokens, scores, types, strict=True))
    trainer = (_pb_field(3, 2)  # model_type = BPE
               + _pb_field(35, int(_BYTE in types))  # byte_fallback
               + _pb_field(40, -1 if unk_id is None else unk_id)
               + _pb_field(41, -1 if bos_id is None else bos_id)
               + _pb_field(42, -1 if eos_id is None else eos_id)
               + _pb_field(43, -1))  # pad_id
    normalizer = (_pb_field(1, b"identity") + _pb_field(3, int(add_space_prefix))
                  + _pb_field(4, 0) + _pb_field(5, 1))  # keep whitespace runs; escape spaces as ▁
    return pieces + _pb_field(2, trainer) + _pb_field(3, normalizer)


def gguf_tokenizer(path: str | Path) -> Tokenizer | None:
    """The file's tokenizer as a models.tokenizer.Tokenizer; None when the file carries none."""
    r = open_gguf(path)
    kind = gguf_metadata(r, "tokenizer.ggml.model")
    if kind is None:
        return None
    tokens: list[str] = gguf_metadata(r, "tokenizer.ggml.tokens") or []
    types: list[int] = gguf_metadata(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bos = gguf_metadata(r, "tokenizer.ggml.bos_token_id")
    eos = gguf_metadata(r, "tokenizer.ggml.eos_token_id")
    backend: Any
    if kind == "gpt2":
        merges = gguf_metadata(r, "tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{path}: a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges")
        backend = _bpe_backend(tokens, merges, types, gguf_metadata(r, "tokenizer.ggml.pre"))
        add_bos_default = False
    elif kind == "llama":
        import sentencepiece as spm

        scores = gguf_metadata(r, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        proto = sentencepiece_proto(tokens, scores, types, gguf_metadata(r, "tokenizer.ggml.unknown_token_id"),
                                    bos, eos, bool(gguf_metadata(r, "tokenizer.ggml.add_space_prefix", True)))
        backend = spm.SentencePieceProcessor(model_proto=proto)
        add_bos_default = True  # llama.cpp adds BOS for sentencepiece vocabularies unless told not to
    else:
        raise ValueError(f"{path}: GGUF tokenizer {kind!r} is not supported (only 'gpt2' and 'llama')")
    return Tokenizer.from_backend(
        backend, bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
        add_bos=bool(gguf_metadata(r, "tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=gguf_metadata(r, "tokenizer.chat_template"))
