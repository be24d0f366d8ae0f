"""The shipped built-in twins (models/builtin/): they load into the plain reference decoder, still model
held-out Shakespeare as well as models/builtin/RESULTS.md says, and carry a working tokenizer.

No network and no engine: the held-out token ids come from models/builtin/val_tokens.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.config import ModelConfig
from models.reference import ReferenceLlama

BUILTIN = Path(__file__).resolve().parents[2] / "models" / "builtin"
TWINS = {"shakespeare-attnres": "block", "shakespeare-residual": "none"}
MAX_TOTAL_BYTES = 40 * 10**6  # both checkpoints together, bf16
LINE = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture(scope="module")
def val() -> dict:
    return json.loads((BUILTIN / "val_tokens.json").read_text(encoding="utf-8"))


def load_twin(name: str) -> tuple[ReferenceLlama, dict[str, torch.Tensor]]:
    folder = BUILTIN / name
    cfg = ModelConfig.from_json_file(folder / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    model = ReferenceLlama(cfg)
    model.load_state_dict(state, strict=True)  # tied: no lm_head.weight in the file or the module
    return model.eval(), state


def heldout_windows(val: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """num_windows windows of `window` targets; each input is BOS + the targets shifted right by one."""
    n, t = val["num_windows"], val["window"]
    ids = torch.tensor(val["ids"][: n * t], dtype=torch.long).view(n, t)
    x = torch.cat([torch.full((n, 1), val["bos_id"], dtype=torch.long), ids[:, :-1]], dim=1)
    return x, ids


@pytest.mark.parametrize("name", sorted(TWINS))
def test_checkpoint_loads_and_models_heldout_text(name: str, val: dict) -> None:
    model, state = load_twin(name)
    cfg = model.cfg
    assert cfg.attn_res_mode == TWINS[name]
    assert cfg.tie_word_embeddings and "lm_head.weight" not in state
    for key, tensor in state.items():  # docs/attnres.md §7: AttnRes vectors fp32, everything else as saved (bf16)
        want = torch.float32 if key.endswith(("_res_norm.weight", "_res_proj.weight")) else torch.bfloat16
        assert tensor.dtype == want, key

    x, y = heldout_windows(val)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (*x.shape, cfg.vocab_size)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    bound = val["loss_bounds"][name]
    assert loss < bound, f"{name}: held-out loss {loss:.4f} >= bound {bound} (models/builtin/RESULTS.md)"
    assert bound < 0.6 * math.log(cfg.vocab_size)  # far better than a uniform guess


def test_twins_differ_only_in_residual_stream() -> None:
    a = ModelConfig.from_json_file(BUILTIN / "shakespeare-attnres" / "config.json")
    b = ModelConfig.from_json_file(BUILTIN / "shakespeare-residual" / "config.json")
    assert a.attn_res_block_size < a.num_hidden_layers  # several blocks
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings")
    assert all(getattr(a, f) == getattr(b, f) for f in shape)
    ka = load_file(str(BUILTIN / "shakespeare-attnres" / "model.safetensors")).keys()
    kb = load_file(str(BUILTIN / "shakespeare-residual" / "model.safetensors")).keys()
    assert {k for k in ka if "_res_" not in k} == set(kb)
    total = sum((BUILTIN / n / "model.safetensors").stat().st_size for n in TWINS)
    assert total <= MAX_TOTAL_BYTES


@pytest.mark.parametrize("name", sorted(TWINS))
def test_tokenizer_roundtrips_shakespeare(name: str, val: dict) -> None:
    import sentencepiece as spm

    folder = BUILTIN / name
    cfg = ModelConfig.from_json_file(folder / "config.json")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert sp.get_piece_size() == cfg.vocab_size
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, cfg.bos_token_id, cfg.eos_token_id)
    ids = sp.encode(LINE)
    assert sp.decode(ids) == LINE
    assert len(ids) < len(LINE) / 2.5  # real merges, not bytes
    assert sp.piece_to_id("\n") in ids
    assert sp.decode(sp.encode("Odd bytes: \u00e9\u4e2d \U0001f600")) == "Odd bytes: \u00e9\u4e2d \U0001f600"
    text = sp.decode(val["ids"][:200])
    assert "\n" in text and text.isascii()

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    gen_cfg = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert sp.piece_to_id(tok_cfg["bos_token"]) == gen_cfg["bos_token_id"] == cfg.bos_token_id
    assert sp.piece_to_id(tok_cfg["eos_token"]) == gen_cfg["eos_token_id"] == cfg.eos_token_id


def test_chat_template_renders_speeches() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok_cfg = json.loads((BUILTIN / "shakespeare-attnres" / "tokenizer_config.json").read_text(encoding="utf-8"))
    messages = [{"role": "system", "content": "A platform before the castle."},
                {"role": "user", "content": "Who's there?"},
                {"role": "assistant", "content": "Nay, answer me.", "name": "Francisco"},
                {"role": "user", "content": "Long live the king!"}]
    for env in (ImmutableSandboxedEnvironment(), ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)):
        template = env.from_string(tok_cfg["chat_template"])
        out = template.render(messages=messages, add_generation_prompt=True)
        assert out == ("[A platform before the castle.]\n\nUser.\nWho's there?\n\nFrancisco.\nNay, answer me.\n\n"
                       "User.\nLong live the king!\n\nAssistant.\n")
        assert template.render(messages=messages[1:2], add_generation_prompt=False) == "User.\nWho's there?\n\n"


def test_special_token_text_encodes_to_its_id() -> None:
    """As Hugging Face tokenizers do: lm-evaluation-harness learns the BOS id by tokenizing "<s>"."""
    from models.tokenizer import Tokenizer

    tok = Tokenizer(BUILTIN / "shakespeare-attnres")
    assert tok.encode("<s>", add_special_tokens=False) == [tok.bos_token_id] == [1]
    assert tok.encode("</s>", add_special_tokens=False) == [tok.eos_token_id] == [2]
    plain = tok.encode("Good night", add_special_tokens=False)
    assert tok.encode("<s>Good night</s>") == [1, 1, *plain, 2]  # the BOS added, then the one in the text
    assert tok.encode("Good night") == [1, *plain]  # text without special tokens is unchanged
    assert (tok.pad_token, tok.unk_token, tok.is_sentencepiece) == (None, "<unk>", True)
