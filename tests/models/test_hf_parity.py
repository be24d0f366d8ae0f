"""The standard-residual serving model matches Hugging Face transformers' LlamaForCausalLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.context import AttentionMetadata, ForwardBatch, PrefillSpan
from models.loader import load_model
from tests.tiny import tiny_config, write_tiny

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [False, True])
def test_standard_model_logits_match_transformers(tmp_path: Path, tie: bool) -> None:
    cfg = tiny_config("none", layers=3, kv_heads=2, tie=tie)
    folder, _ = write_tiny(tmp_path / "m", cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([1, 17, 42, 99, 7, 250, 3, 11, 64])
    with torch.no_grad():
        want = hf(ids.unsqueeze(0)).logits[0]
    model = load_model(folder, torch.float32)
    t = ids.numel()
    kv = [(torch.zeros(t, 2, cfg.head_dim), torch.zeros(t, 2, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
    batch = ForwardBatch(ids, torch.arange(t), AttentionMetadata(torch.arange(t), prefills=[PrefillSpan(0, t, t, None, None)]),
                         torch.arange(t), kv)
    got = model.compute_logits(model(batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
