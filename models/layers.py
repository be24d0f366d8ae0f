"""Building blocks of the serving model: RMSNorm, rotary, paged attention, TP-aware linears, SwiGLU.

Every module works on a flat packed batch [T, ...]; none pads or loops over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.context import AttentionMetadata, Communicator, ForwardBatch


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32, cast to the weight's (serving) dtype, scale: Hugging Face's order."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """Half-rotation rotary (Hugging Face Llama convention) with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, hd/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, hd/2] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, hd]; rotate halves in fp32, return in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ w[out, in]^T. One row (batch-1 decode) goes through mv: on CPU, bf16 GEMV streams
    weights from memory about 1.5x faster than the GEMM path F.linear takes for a single row."""
    if x.shape[0] == 1:
        return torch.mv(w, x[0]).unsqueeze(0)
    return F.linear(x, w)


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an evenly split dimension owned by `rank`."""
    if size % world:
        raise ValueError(f"dimension {size} does not divide evenly over tensor_parallel_size={world}")
    step = size // world
    return rank * step, (rank + 1) * step


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the paged cache, then attend each row to its own sequence.

    q: [T, H, hd]; k, v: [T, KV, hd]; caches: [num_slots, KV, hd]. Returns [T, H, hd].
    Decode rows (one query per sequence) are attended in one batched call; prompt chunks one call each.
    """
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        b, c = meta.decode_gather.shape
        flat = meta.decode_gather.reshape(-1)  # index_select is much faster than advanced indexing here
        kk = k_cache.index_select(0, flat).view(b, c, *k_cache.shape[1:]).transpose(1, 2)  # [B, KV, C, hd]
        vv = v_cache.index_select(0, flat).view(b, c, *v_cache.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kk, vv, attn_mask=meta.decode_mask,
                                           scale=scale, enable_gqa=gqa)  # [B, H, 1, hd]
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        # 4-D [1, H, T, hd] inputs: CPU SDPA takes its flash kernel only with a batch dim (3-D inputs
        # fall back to the math path, ~25x slower at 2048 tokens).
        qq = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        if p.gather_slots is None:
            kk = k[p.start:p.end].transpose(0, 1).unsqueeze(0)
            vv = v[p.start:p.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            kk = k_cache.index_select(0, p.gather_slots).transpose(0, 1).unsqueeze(0)  # [1, KV, C, hd]
            vv = v_cache.index_select(0, p.gather_slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=p.mask, scale=scale, enable_gqa=gqa)
        out[p.start:p.end] = o[0].transpose(0, 1)
    return out


class Attention(nn.Module):
    """GQA self-attention: merged column-parallel QKV, row-parallel o_proj, KV heads sharded or replicated."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, rope: RotaryEmbedding,
                 dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        world = comm.world_size if comm else 1
        if heads % world:
            raise ValueError(f"num_attention_heads={heads} must be divisible by tensor_parallel_size={world}")
        self.heads = heads // world
        self.kv_heads = max(1, kv_heads // world)  # replicate when kv_heads < world
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.comm = comm
        self.rope = rope
        self.qkv_proj = nn.Parameter(torch.empty((self.heads + 2 * self.kv_heads) * head_dim, hidden, dtype=dtype),
                                     requires_grad=False)
        self.o_proj = nn.Parameter(torch.empty(hidden, self.heads * head_dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, layer: int, cos_sin: tuple) -> torch.Tensor:
        t = x.shape[0]
        qkv = linear(x, self.qkv_proj)
        nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :nq].view(t, self.heads, self.head_dim)
        k = qkv[:, nq:nq + nk].view(t, self.kv_heads, self.head_dim)
        v = qkv[:, nq + nk:].view(t, self.kv_heads, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = batch.kv_caches[layer]
        o = paged_attention(q, k, v, k_cache, v_cache, batch.attn, self.scale)
        out = linear(o.reshape(t, -1), self.o_proj)
        return self.comm.all_reduce(out) if self.comm else out


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with merged column-parallel gate/up and row-parallel down."""

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        world = comm.world_size if comm else 1
        if ffn % world:
            raise ValueError(f"intermediate_size={ffn} must be divisible by tensor_parallel_size={world}")
        self.ffn = ffn // world
        self.comm = comm
        self.gate_up_proj = nn.Parameter(torch.empty(2 * self.ffn, hidden, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(hidden, self.ffn, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = linear(x, self.gate_up_proj)
        out = linear(F.silu(gu[:, :self.ffn]) * gu[:, self.ffn:], self.down_proj)
        return self.comm.all_reduce(out) if self.comm else out


class VocabParallelEmbedding(nn.Module):
    """Embedding (and tied or untied lm_head) split by vocabulary rows over TP ranks."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        world = comm.world_size if comm else 1
        rank = comm.rank if comm else 0
        self.padded_vocab = -(-vocab // world) * world
        self.vocab = vocab
        self.lo, self.hi = shard_range(self.padded_vocab, rank, world)
        self.comm = comm
        self.weight = nn.Parameter(torch.zeros(self.hi - self.lo, hidden, dtype=dtype), requires_grad=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return F.embedding(ids, self.weight)
        local = ids - self.lo
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        return self.comm.all_reduce(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [S, d] -> fp32 logits [S, vocab]."""
        out = linear(h, self.weight).float()
        if self.comm is not None:
            out = self.comm.all_gather_last_dim(out)
        return out[:, :self.vocab]
