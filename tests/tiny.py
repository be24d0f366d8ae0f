"""Tiny random checkpoints (with a real sentencepiece tokenizer) written to disk for tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.ops import KernelSet
from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.context import AttentionMetadata
from models.reference import ReferenceLlama

CORPUS = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "All the world's a stage, and all the men and women merely players; they have their exits "
    "and their entrances. Now is the winter of our discontent made glorious summer by this sun of York. "
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
)


# Prompts of the engine-vs-reference checks (tests and loadtest.device_check): different lengths, two that
# share a 10-token prefix (prefix-cache hits with small blocks), one short.
PROMPTS = [
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17],  # shares 10 tokens with the first
    [1, 20, 30],
    [1, 5, 6, 7, 8, 9, 10, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48],
]
MAX_TOKENS = 10


def train_tokenizer(folder: Path, vocab_size: int = 400) -> None:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join([CORPUS] * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    text.unlink()


def tiny_config(mode: str = "block", block_size: int = 2, layers: int = 5, kv_heads: int = 2,
                tie: bool = False, vocab: int = 400, max_pos: int = 256) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                       rope_theta=10000.0, tie_word_embeddings=tie, attn_res_mode=mode,  # type: ignore[arg-type]
                       attn_res_block_size=block_size if mode == "block" else 0)


def random_model(cfg: ModelConfig, seed: int = 0) -> ReferenceLlama:
    """Random weights with peaked logits and non-trivial (non-uniform) AttnRes depth weights."""
    torch.manual_seed(seed)
    model = ReferenceLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def write_tiny(folder: Path, cfg: ModelConfig, seed: int = 0, tokenizer_from: Path | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Path, ReferenceLlama]:
    model = random_model(cfg, seed)
    save_checkpoint(model.state_dict(), cfg, folder, dtype=dtype)
    if tokenizer_from is not None:
        (folder / "tokenizer.model").write_bytes((tokenizer_from / "tokenizer.model").read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder, model


@functools.cache
def expected_greedy(mode: str, block_size: int, layers: int) -> tuple[tuple[int, ...], ...]:
    """reference_greedy of PROMPTS for the write_tiny model of tiny_config(mode, block_size, layers=layers)
    (seed 0), once per pytest process: several modules check the engine against the same few models."""
    model = random_model(tiny_config(mode, block_size, layers=layers))
    return tuple(tuple(reference_greedy(model, p, MAX_TOKENS)) for p in PROMPTS)


@torch.no_grad()
def reference_greedy(model: ReferenceLlama, prompt: list[int], max_tokens: int, stop_ids: tuple[int, ...] = (),
                     device: str = "cpu") -> list[int]:
    """Greedy decoding by full recompute: the oracle for the engine (the model on `device`)."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(model(torch.tensor([ids], device=device))[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok in stop_ids:
            break
    return out


# ---- a capture-safe decode attention in plain PyTorch, to test the CUDA-graph machinery without Triton ----------
def static_table_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode attention over the whole block table (every column, whatever the lengths) with the mask built
    on the device from the context lengths: fixed shapes, no host sync, so a CUDA graph can hold it. It reads
    max_blocks * block_size slots per row, so it is a test double, not a kernel. q [B, H, hd] -> [B, H, hd]."""
    table, lens = meta.decode_block_table, meta.decode_context_lens
    b, nb = table.shape
    bs = meta.block_size
    c = nb * bs
    slots = (table.unsqueeze(-1) * bs + torch.arange(bs, device=table.device)).reshape(-1)  # [B * C]
    kk = k_cache.index_select(0, slots).view(b, c, *k_cache.shape[1:]).transpose(1, 2)  # [B, KV, C, hd]
    vv = v_cache.index_select(0, slots).view(b, c, *v_cache.shape[1:]).transpose(1, 2)
    mask = (torch.arange(c, device=lens.device).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k_cache.shape[1])
    return o.squeeze(2)


STATIC_TABLE_OPS = KernelSet(decode_attention=static_table_decode_attention, graph_safe_decode=True)
