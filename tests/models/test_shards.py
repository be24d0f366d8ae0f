"""models.parallel_plan: shard sizes per rank, and each parameter's weight_loader picks exactly its slice."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.model_runner import kv_bytes_per_block
from models.config import ModelConfig
from models.llama import LlamaForServing
from models.parallel_plan import InMemoryTensor, shard_sizes
from tests.tiny import random_model


def config(heads: int, kv: int, ffn: int = 96, vocab: int = 400, mode: str = "none", hidden: int = 64,
           tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                       rope_theta=10000.0, tie_word_embeddings=tie, attn_res_mode=mode,  # type: ignore[arg-type]
                       attn_res_block_size=1 if mode == "block" else 0)


# (heads, kv heads, ffn, vocab, tp) -> (local heads, local kv heads, ranks per kv head, local ffn, local vocab)
SIZES = [
    ((4, 2, 96, 400, 1), (4, 2, 1, 96, 400)),
    ((4, 1, 96, 400, 2), (2, 1, 2, 48, 200)),  # kv < tp: the one KV head on both ranks
    ((4, 2, 96, 401, 2), (2, 1, 1, 48, 201)),  # kv = tp; odd vocab padded to 402
    ((8, 4, 96, 400, 2), (4, 2, 1, 48, 200)),  # kv > tp
    ((8, 2, 96, 399, 4), (2, 1, 2, 24, 100)),  # kv < tp: each KV head on two ranks
]


@pytest.mark.parametrize(("shape", "want"), SIZES, ids=[str(s) for s, _ in SIZES])
def test_shard_sizes(shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    heads, kv, ffn, vocab, tp = shape
    cfg = config(heads, kv, ffn, vocab)
    s = shard_sizes(cfg, tp)
    assert (s.heads, s.kv_heads, s.kv_replicas, s.intermediate, s.vocab) == want
    assert s.padded_vocab >= vocab and s.padded_vocab % tp == 0 and s.padded_vocab - vocab < tp
    hd = cfg.head_dim
    assert kv_bytes_per_block(cfg, torch.float32, 16, tp) == 2 * 2 * 16 * s.kv_heads * hd * 4
    # Every query head and KV head has an owner; replicas of one KV head sit on consecutive ranks.
    q = [i for r in range(tp) for i in range(heads * hd)[s.q_rows(r)]]
    assert q == list(range(heads * hd))
    kv_heads_seen = [s.kv_rows(r).start // hd for r in range(tp)]
    assert sorted(set(kv_heads_seen)) == list(range(0, kv, s.kv_heads)) and kv_heads_seen == sorted(kv_heads_seen)


@pytest.mark.parametrize(("shape", "message"), [
    ((4, 2, 96, 3), "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    ((4, 4, 90, 4), "intermediate_size=90 is not divisible by tensor_parallel_size=4"),
    ((6, 3, 96, 2), "num_key_value_heads=3 must divide, or be a multiple of, tensor_parallel_size=2"),
    ((6, 2, 96, 3), "num_key_value_heads=2 must divide, or be a multiple of, tensor_parallel_size=3"),
    ((4, 2, 96, 0), "tensor_parallel_size must be >= 1"),
])
def test_indivisible_shapes_fail(shape: tuple[int, ...], message: str) -> None:
    heads, kv, ffn, tp = shape
    cfg = config(heads, kv, ffn, hidden=96)
    with pytest.raises(ValueError, match=message):
        shard_sizes(cfg, tp)
    if tp > 0:  # the model builds its layers from the same sizes, so it refuses the same shapes
        with pytest.raises(ValueError, match=message):
            LlamaForServing(cfg, comm=FakeComm(0, tp))


@dataclass
class FakeComm:
    """A rank's view of the group: enough to build and load a shard (loading needs no collectives)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("loading must not communicate")

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("loading must not communicate")


class RecordingReader(InMemoryTensor):
    """A lazy reader (as GGUF and safetensors give) that records which rows/columns were asked for."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(t)
        self.reads: list[tuple[slice | None, slice | None]] = []

    def read(self, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        self.reads.append((rows, cols))
        return super().read(rows, cols)


def load_rank(cfg: ModelConfig, state: dict[str, torch.Tensor], rank: int, tp: int
              ) -> tuple[LlamaForServing, dict[str, RecordingReader]]:
    model = LlamaForServing(cfg, comm=FakeComm(rank, tp) if tp > 1 else None)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)  # whatever a loader leaves unwritten shows
    readers = {name: RecordingReader(t) for name, t in state.items()}
    model.load_weights(readers.items())  # looks each parameter up by name and calls its weight_loader
    return model, readers


@pytest.mark.parametrize(("heads", "kv", "vocab", "tp", "mode", "tie"), [
    (4, 1, 400, 2, "none", False),  # kv < tp
    (4, 2, 401, 2, "block", False),  # kv = tp, odd vocab
    (8, 4, 400, 2, "full", True),  # kv > tp, tied embeddings
    (8, 2, 399, 4, "none", False),  # kv < tp, two ranks per KV head
])
def test_weight_loaders_pick_each_ranks_slice(heads: int, kv: int, vocab: int, tp: int, mode: str,
                                              tie: bool) -> None:
    cfg = config(heads, kv, vocab=vocab, mode=mode, tie=tie)
    state = {k: v.detach().clone() for k, v in random_model(cfg, seed=2).state_dict().items()}
    s = shard_sizes(cfg, tp)
    hd = cfg.head_dim
    nq, nk, f = s.heads * hd, s.kv_heads * hd, s.intermediate
    ranks = [load_rank(cfg, state, r, tp) for r in range(tp)]
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        full = {k.removeprefix(pre): v for k, v in state.items() if k.startswith(pre)}
        qkv = [m.layers[i].self_attn.qkv_proj.weight for m, _ in ranks]
        o = [m.layers[i].self_attn.o_proj.weight for m, _ in ranks]
        gate_up = [m.layers[i].mlp.gate_up_proj.weight for m, _ in ranks]
        down = [m.layers[i].mlp.down_proj.weight for m, _ in ranks]
        assert qkv[0].shape == (nq + 2 * nk, cfg.hidden_size) and o[0].shape == (cfg.hidden_size, nq)
        assert gate_up[0].shape == (2 * f, cfg.hidden_size) and down[0].shape == (cfg.hidden_size, f)
        # Column-parallel: the ranks' row blocks stack back into the full weight.
        assert torch.equal(torch.cat([w[:nq] for w in qkv]), full["self_attn.q_proj.weight"])
        assert torch.equal(torch.cat([w[:f] for w in gate_up]), full["mlp.gate_proj.weight"])
        assert torch.equal(torch.cat([w[f:] for w in gate_up]), full["mlp.up_proj.weight"])
        # Row-parallel: the ranks' column blocks stack back into the full weight.
        assert torch.equal(torch.cat(o, dim=1), full["self_attn.o_proj.weight"])
        assert torch.equal(torch.cat(down, dim=1), full["mlp.down_proj.weight"])
        # KV: each rank holds its heads' rows (a shared head when replicated); together every head.
        for name, off in (("self_attn.k_proj.weight", nq), ("self_attn.v_proj.weight", nq + nk)):
            parts = [w[off:off + nk] for w in qkv]
            for r, part in enumerate(parts):
                assert torch.equal(part, full[name][s.kv_rows(r)])
            assert torch.equal(torch.cat(parts[::s.kv_replicas]), full[name])
        for m, _ in ranks:  # replicated per-layer vectors
            layer = m.layers[i]
            assert torch.equal(layer.input_layernorm.weight, full["input_layernorm.weight"])
            assert torch.equal(layer.post_attention_layernorm.weight, full["post_attention_layernorm.weight"])
            if cfg.is_attn_res:
                for site, prefix in enumerate(("self_attention_res", "mlp_res")):
                    assert torch.equal(m.res_norm[i, site], full[f"{prefix}_norm.weight"])
                    assert torch.equal(m.res_proj[i, site], full[f"{prefix}_proj.weight"].reshape(-1))
    # Vocab-parallel: row ranges of the padded vocabulary; padding rows are zero.
    heads_out = ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"])
    for name in heads_out:
        parts = [(m.embed_tokens if name.startswith("model.") else m.lm_head).weight for m, _ in ranks]
        assert all(p.shape == (s.vocab, cfg.hidden_size) for p in parts)
        stacked = torch.cat(parts)
        assert torch.equal(stacked[:vocab], state[name]) and not stacked[vocab:].any()
    for m, _ in ranks:
        assert torch.equal(m.norm.weight, state["model.norm.weight"])
        if cfg.is_attn_res:
            assert torch.equal(m.out_proj, state["model.output_attn_res_proj.weight"].reshape(-1))
            assert torch.equal(m.out_norm, state["model.output_attn_res_norm.weight"])
    # Lazy: a rank reads only its slice of every sharded tensor, each exactly once.
    for r, (_, readers) in enumerate(ranks):
        want = {"q_proj": (s.q_rows(r), None), "k_proj": (s.kv_rows(r), None), "v_proj": (s.kv_rows(r), None),
                "o_proj": (None, s.q_rows(r)), "gate_proj": (s.intermediate_rows(r), None),
                "up_proj": (s.intermediate_rows(r), None), "down_proj": (None, s.intermediate_rows(r))}
        for name, reader in readers.items():
            kind = name.rsplit(".", 2)[-2]
            if kind in want:
                assert reader.reads == [want[kind]], name
            elif name in heads_out:
                lo = s.vocab_rows(r).start
                assert reader.reads == [(slice(lo, min(lo + s.vocab, vocab)), None)], name
            elif not (tie and name == "lm_head.weight"):
                assert reader.reads == [(None, None)], name


def test_weight_loader_takes_a_plain_tensor_too() -> None:
    cfg = config(4, 2)
    full = torch.randn(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    model = LlamaForServing(cfg, comm=FakeComm(1, 2))
    param = model.layers[0].self_attn.qkv_proj.weight
    param.weight_loader(param, full, "q")
    assert torch.equal(param[: full.shape[0] // 2], full[full.shape[0] // 2:])
