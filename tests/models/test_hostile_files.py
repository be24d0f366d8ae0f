"""Broken or hostile model files: each fails with one ValueError line naming the config field, GGUF key or
tensor, before any parameter is allocated (a lying size must not turn into a 34 GiB allocation), and
`depthserve serve` reports it in one stderr line with exit status 2 and no traceback."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.arg_utils import EngineArgs
from engine.llm_engine import LLMEngine
from models.llama import LlamaForServing
from models.loader import load_config, load_model
from tests.models.test_gguf import gguf_name
from tests.tiny import random_model, tiny_config, write_tiny

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
# More elements than any tensor or table of the tiny models, far fewer than a hostile file asks for.
MAX_ELEMENTS = 2**22
CFG = tiny_config("none", layers=2, kv_heads=2)  # vocab 400, hidden 64, ffn 96, 4 heads of 16, 256 positions


def _numel(fn: str, args: tuple[Any, ...], kw: dict[str, Any]) -> int:
    nums = [a for a in args if isinstance(a, int | float)]
    if fn == "arange":
        start, end, step = (0, nums[0], 1) if len(nums) == 1 else (*nums[:2], nums[2] if len(nums) > 2 else 1)
        return max(0, math.ceil((end - start) / step))
    size = args[0] if args and isinstance(args[0], tuple | list | torch.Size) else nums
    return math.prod(int(n) for n in size)


@pytest.fixture(autouse=True)
def no_big_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn an allocation sized by unchecked metadata into a test failure instead of an OOM-killed run."""
    for fn in ("empty", "zeros", "ones", "full", "arange"):
        real = getattr(torch, fn)

        def guarded(*args: Any, _real: Callable[..., torch.Tensor] = real, _fn: str = fn, **kw: Any) -> torch.Tensor:
            n = _numel(_fn, args, kw)
            if n > MAX_ELEMENTS:
                raise AssertionError(f"torch.{_fn} of {n} elements: sized from metadata before validation")
            return _real(*args, **kw)

        monkeypatch.setattr(torch, fn, guarded)


@pytest.fixture()
def not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file must be rejected from its headers, before the model (and its parameters) exists."""
    def boom(self: LlamaForServing, *args: Any, **kw: Any) -> None:
        raise AssertionError("LlamaForServing was built before the checkpoint was validated")

    monkeypatch.setattr(LlamaForServing, "__init__", boom)


# ---- config.json + safetensors ------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("good") / "m", CFG)[0]


@pytest.fixture()
def folder(good_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_folder, tmp_path / "m"))


def _edit_config(folder: Path, change: dict[str, Any] | str) -> None:
    if isinstance(change, str):
        (folder / "config.json").write_text(change)
        return
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))


CONFIG_CASES: list[tuple[str, dict[str, Any] | str, str]] = [
    ("not-json", '{"hidden_size": 64,', r"config\.json is not valid JSON"),
    ("deep-json", "[" * 100_000, r"config\.json is not valid JSON"),
    ("not-object", "[1, 2]", r"config\.json: must be a JSON object, got list"),
    ("string-int", {"hidden_size": "64"}, r"config\.json: hidden_size must be an integer, got '64'"),
    ("bool-int", {"num_hidden_layers": True}, r"config\.json: num_hidden_layers must be an integer, got True"),
    ("float-int", {"intermediate_size": 96.0}, r"config\.json: intermediate_size must be an integer, got 96\.0"),
    ("string-float", {"rms_norm_eps": "1e-5"}, r"config\.json: rms_norm_eps must be a number, got '1e-5'"),
    ("nan-eps", {"rms_norm_eps": float("nan")}, r"config\.json: rms_norm_eps must be a finite number > 0, got nan"),
    ("zero-theta", {"rope_theta": 0}, r"config\.json: rope_theta must be a finite number > 0, got 0"),
    ("string-bool", {"tie_word_embeddings": "no"}, r"config\.json: tie_word_embeddings must be true or false"),
    ("string-archs", {"architectures": "LlamaForCausalLM"}, r"config\.json: architectures must be a list"),
    ("string-rope-scaling", {"rope_scaling": "linear"}, r"config\.json: rope_scaling must be an object or null"),
    ("negative-layers", {"num_hidden_layers": -1}, r"config\.json: num_hidden_layers must be >= 1, got -1"),
    ("zero-hidden", {"hidden_size": 0}, r"config\.json: hidden_size must be >= 1, got 0"),
    ("huge-hidden", {"hidden_size": 2**40}, r"config\.json: hidden_size must be <= 2147483647, got 1099511627776"),
    ("huge-context", {"max_position_embeddings": 2**32 - 1},
     r"config\.json: max_position_embeddings must be <= 2147483647, got 4294967295"),
    ("huge-layers", {"num_hidden_layers": 2**20}, r"config\.json: num_hidden_layers must be <= 65536"),
    ("negative-bos", {"bos_token_id": -5}, r"config\.json: bos_token_id must be >= 0, got -5"),
    ("heads-not-dividing-hidden", {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": None},
     r"config\.json: hidden_size \(64\) must be divisible by num_attention_heads \(6\) when head_dim is not given"),
    ("odd-head-dim", {"head_dim": 15}, r"config\.json: head_dim must be even"),
    ("huge-vocab", {"vocab_size": 2**30},
     r"config\.json: tensor 'model\.embed_tokens\.weight' has shape \[400, 64\], expected \[1073741824, 64\] "
     r"from vocab_size=1073741824$"),
    ("big-ffn", {"intermediate_size": 2**26},
     r"config\.json: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[96, 64\], "
     r"expected \[67108864, 64\] from intermediate_size=67108864$"),
    ("more-heads", {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16},
     r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[64, 64\], expected \[128, 64\] "
     r"from num_attention_heads=8, head_dim=16$"),
    ("more-layers", {"num_hidden_layers": 4000},
     r"config\.json: num_hidden_layers=4000 does not match the checkpoint, whose tensors name layers up to 1"),
]


@pytest.mark.usefixtures("not_built")
@pytest.mark.parametrize(("change", "message"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json(folder: Path, change: dict[str, Any] | str, message: str) -> None:
    _edit_config(folder, change)
    with pytest.raises(ValueError, match=message) as e:
        load_model(folder, torch.float32)
    assert "\n" not in str(e.value)


def _rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _rewrite_header(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _truncate(path: Path, keep: Callable[[int], int]) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:keep(len(raw))])


K = "model.layers.0.self_attn.k_proj.weight"
SAFETENSORS_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing-tensor", lambda f: _rewrite_tensors(f, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
     r"config\.json: checkpoint is missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'$"),
    ("unexpected-tensor", lambda f: _rewrite_tensors(f, lambda t: t.update({"model.extra.weight": torch.ones(2)})),
     r"config\.json: checkpoint has unexpected tensor 'model\.extra\.weight'"),
    ("wrong-shape", lambda f: _rewrite_tensors(f, lambda t: t.update({K: torch.zeros(3, 3)})),
     r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[3, 3\], expected \[32, 64\] "
     r"from num_key_value_heads=2, head_dim=16, hidden_size=64$"),
    ("int-dtype", lambda f: _rewrite_tensors(f, lambda t: t.update({K: torch.zeros(32, 64, dtype=torch.int32)})),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has dtype I32"),
    ("truncated-data", lambda f: _truncate(f / "model.safetensors", lambda n: n // 2),
     r"model\.safetensors: tensor '.+' header says shape .* \(truncated or corrupt\)$"),
    ("truncated-header", lambda f: _truncate(f / "model.safetensors", lambda n: 100),
     r"model\.safetensors: header length \d+ runs past the end of the file"),
    ("truncated-length", lambda f: _truncate(f / "model.safetensors", lambda n: 4),
     r"model\.safetensors: not a readable safetensors file"),
    ("header-lies-shape", lambda f: _rewrite_header(f, lambda h: h[K].update(shape=[64, 64])),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' header says shape \[64, 64\] F32 "
     r"\(16384 bytes\) but its data_offsets \[\d+, \d+\] span 8192 bytes"),
    ("header-lies-offsets", lambda f: _rewrite_header(f, lambda h: h[K].update(data_offsets=[0, 2**40])),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' header says"),
    ("header-not-entries", lambda f: _rewrite_header(f, lambda h: h.update({K: "zeros"})),
     r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has a malformed header entry"),
    ("index-escapes-folder", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {K: "../elsewhere.safetensors"}})),
     r"model\.safetensors\.index\.json: shard '\.\./elsewhere\.safetensors' is not a file name"),
]


@pytest.mark.usefixtures("not_built")
@pytest.mark.parametrize(("corrupt", "message"), [c[1:] for c in SAFETENSORS_CASES],
                         ids=[c[0] for c in SAFETENSORS_CASES])
def test_bad_safetensors(folder: Path, corrupt: Callable[[Path], None], message: str) -> None:
    corrupt(folder)
    with pytest.raises(ValueError, match=message) as e:
        load_model(folder, torch.float32)
    assert "\n" not in str(e.value)


# ---- GGUF -----------------------------------------------------------------------------------------
GOOD_META: dict[str, Any] = {
    "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
    "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
}


def write_gguf(path: Path, meta: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
               tensors: dict[str, np.ndarray] | None = None) -> Path:
    """The tiny model as GGUF with metadata `meta` laid over GOOD_META (None: leave the key out)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in {**GOOD_META, **(meta or {})}.items():
        if v is None:
            continue
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        elif isinstance(v, list):
            w.add_array(key, v)
        elif v < 0:
            w.add_int32(key, v)
        else:
            (w.add_uint64 if v >= 2**32 else w.add_uint32)(key, v)
    arrays = {gguf_name(k): t.detach().float().numpy() for k, t in random_model(CFG).state_dict().items()}
    arrays.update(tensors or {})
    for name, arr in arrays.items():
        if name not in drop:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("huge-ffn", dict(meta={"llama.feed_forward_length": 2**26}),
     r"model\.gguf: tensor blk\.0\.ffn_gate\.weight has shape \[96, 64\], expected \[67108864, 64\] "
     r"from llama\.feed_forward_length=67108864$"),
    ("huge-context", dict(meta={"llama.context_length": 2**32 - 1}),
     r"model\.gguf: llama\.context_length must be <= 2147483647, got 4294967295$"),
    ("zero-heads", dict(meta={"llama.attention.head_count": 0}),
     r"model\.gguf: llama\.attention\.head_count must be >= 1, got 0$"),
    ("kv-heads-not-dividing", dict(meta={"llama.attention.head_count_kv": 3}),
     r"model\.gguf: llama\.attention\.head_count \(4\) must be a multiple of llama\.attention\.head_count_kv \(3\)"),
    ("hidden-not-dividing", dict(meta={"llama.embedding_length": 66}),
     r"model\.gguf: llama\.embedding_length \(66\) must be divisible by llama\.attention\.head_count \(4\)"),
    ("wrong-hidden", dict(meta={"llama.embedding_length": 128}),
     r"model\.gguf: tensor token_embd\.weight has shape \[400, 64\], expected \[400, 128\] "
     r"from llama\.embedding_length=128$"),
    ("odd-key-length", dict(meta={"llama.attention.key_length": 15}),
     r"model\.gguf: llama\.attention\.key_length must be even"),
    ("more-blocks", dict(meta={"llama.block_count": 1000}),
     r"model\.gguf: llama\.block_count=1000 does not match the checkpoint, whose tensors name layers up to 1$"),
    ("huge-blocks", dict(meta={"llama.block_count": 2**40}), r"model\.gguf: llama\.block_count must be <= 65536"),
    ("string-ffn", dict(meta={"llama.feed_forward_length": "96"}),
     r"model\.gguf: llama\.feed_forward_length must be an integer, got '96'$"),
    ("float-ffn", dict(meta={"llama.feed_forward_length": 96.0}),
     r"model\.gguf: llama\.feed_forward_length must be an integer, got 96\.0$"),
    ("negative-eps", dict(meta={"llama.attention.layer_norm_rms_epsilon": -1.0}),
     r"model\.gguf: llama\.attention\.layer_norm_rms_epsilon must be a finite number > 0, got -1\.0$"),
    ("missing-ffn", dict(meta={"llama.feed_forward_length": None}),
     r"model\.gguf: GGUF metadata lacks llama\.feed_forward_length$"),
    ("missing-tensor", dict(drop=("blk.1.ffn_down.weight",)),
     r"model\.gguf: checkpoint is missing tensor blk\.1\.ffn_down\.weight$"),
    ("unknown-tensor", dict(tensors={"blk.0.weird.weight": np.ones(4, np.float32)}),
     r"model\.gguf: GGUF tensor 'blk\.0\.weird\.weight' has no counterpart in a Llama decoder$"),
    ("int-tensor", dict(tensors={"blk.0.attn_k.weight": np.zeros((32, 64), np.int32)}),
     r"model\.gguf: tensor blk\.0\.attn_k\.weight has type I32, which depthserve cannot load$"),
]


@pytest.mark.usefixtures("not_built")
@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf_metadata(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    path = write_gguf(tmp_path / "model.gguf", **spec)
    with pytest.raises(ValueError, match=message) as e:
        load_model(path, torch.float32)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf")


@pytest.mark.usefixtures("not_built")
@pytest.mark.parametrize("keep", [6, 100, 1000, -100], ids=["magic", "header", "metadata", "tensor-data"])
def test_truncated_gguf(good_gguf: Path, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "model.gguf"
    raw = good_gguf.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=r"^model\.gguf is not a readable GGUF file \(truncated or corrupt\)") as e:
        load_config(path)
    assert "\n" not in str(e.value)


# ---- the rotary table covers what is served, not what the file claims ------------------------------
@pytest.fixture()
def long_context_gguf(tmp_path: Path) -> Iterator[Path]:
    """A legal but huge context_length: 2^30 positions would be a 128 MiB x head_dim rotary table."""
    yield write_gguf(tmp_path / "model.gguf", meta={"llama.context_length": 2**30})


def test_rotary_table_sized_by_max_model_len(long_context_gguf: Path) -> None:
    model = load_model(long_context_gguf, torch.float32, max_model_len=256)
    assert model.cfg.max_position_embeddings == 2**30
    assert model.rope.cos.shape == (256, 8)


def test_engine_sizes_rotary_from_max_model_len(long_context_gguf: Path) -> None:
    eng = LLMEngine(EngineArgs(model=str(long_context_gguf), num_threads=1, kv_cache_memory="1MiB", max_num_seqs=2,
                               max_num_batched_tokens=256, max_model_len=256).create_engine_config())
    try:
        assert eng.max_model_len == 256 and eng.model.rope.cos.shape[0] == 256
    finally:
        eng.shutdown()


# ---- the CLI: one line, exit status 2 -------------------------------------------------------------
def _zero_heads_gguf(d: Path) -> tuple[Path, str]:
    d.mkdir()
    write_gguf(d / "model.gguf", meta={"llama.attention.head_count": 0})
    return d, "llama.attention.head_count must be >= 1, got 0"


def _truncated_safetensors(d: Path) -> tuple[Path, str]:
    write_tiny(d, CFG)
    _truncate(d / "model.safetensors", lambda n: n - 1000)
    return d, "(truncated or corrupt)"


@pytest.mark.parametrize("make", [_zero_heads_gguf, _truncated_safetensors], ids=["gguf-zero-heads", "truncated"])
def test_cli_serve_reports_bad_model_in_one_line(tmp_path: Path, make: Callable[[Path], tuple[Path, str]]) -> None:
    model, field = make(tmp_path / "bad")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", "0",
                           "--num-threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("depthserve: error: ") and field in lines[0], proc.stderr
