"""Building blocks of the serving model: RMSNorm, rotary, paged attention, TP-aware linears, SwiGLU.

The tensor-parallel layers create their parameters with this rank's shard shape (from
models.parallel_plan.shard_sizes) and attach `param.weight_loader(param, tensor_or_reader, shard_id=None)`,
which copies this rank's slice of a checkpoint tensor, reading only that slice from a lazy reader.

Every module works on a flat packed batch [T, ...]; none pads or loops over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops, quant, reference
from kernels.quant import QuantFormat
from models.context import AttentionMetadata, Communicator, ForwardBatch
from models.parallel_plan import ShardSizes, TensorSource, as_source


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


linear = reference.linear  # x [T, in] @ w[out, in]^T on the plain weight (kernels/reference.py)


class PackedWeight:
    """Mixin for a module whose `weight` a linear reads: `prepare_weights(backend)` packs it once after
    loading (kernels.ops); until then, and on the reference backend, the plain weight is used. A weight served
    quantized (models/quantization.py) is uint8 blocks of format `quant`."""

    packed: ops.PackedLinear | None = None
    quant: QuantFormat | None = None

    def prepare_weights(self, backend: ops.Backend, int8_activations: bool = False) -> None:
        self.packed = ops.pack_linear(self.weight, backend, self.quant, int8_activations)  # type: ignore[attr-defined]

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            if self.quant is not None:
                return quant.reference_linear(x, self.weight, self.quant)  # type: ignore[attr-defined]
            return linear(x, self.weight)  # type: ignore[attr-defined]
        return ops.linear(x, self.packed)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    decode_attention: Callable[..., torch.Tensor] = reference.decode_attention,
                    store_kv: Callable[..., None] = reference.store_kv) -> torch.Tensor:
    """Write this step's K/V into the paged cache (the kernel set's store_kv), then attend each row to its own
    sequence.

    q: [T, H, hd]; k, v: [T, KV, hd]; caches: [num_slots, KV, hd]. Returns [T, H, hd].
    Decode rows (one query per sequence) go to the kernel set's decode_attention in one call; prompt
    chunks through SDPA one call each.
    """
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    gqa = q.shape[1] != k.shape[1]
    nd = meta.num_decode
    if nd == q.shape[0]:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta, scale)
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


class ColumnParallelLinear(PackedWeight, nn.Module):
    """y = x W^T with W's output rows split over ranks; each rank keeps its own columns of y (no collective).

    `parts` stacks several checkpoint tensors into one matmul (Q/K/V, gate/up): shard_id -> (local rows,
    the checkpoint rows a rank owns), in order. A plain column-parallel linear has the one part None.
    """

    def __init__(self, in_features: int, parts: Mapping[Hashable, tuple[int, Callable[[int], slice]]],
                 rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rank = rank
        self.parts: dict[Hashable, tuple[int, int, Callable[[int], slice]]] = {}
        off = 0
        for shard_id, (n, rows) in parts.items():
            self.parts[shard_id] = (off, n, rows)
            off += n
        self.weight = nn.Parameter(torch.empty(off, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @torch.no_grad()
    def weight_loader(self, param: torch.Tensor, loaded: TensorSource | torch.Tensor,
                      shard_id: Hashable = None) -> None:
        """Copy this rank's rows of checkpoint tensor `shard_id` into its place in `param`."""
        off, n, rows = self.parts[shard_id]
        param[off:off + n].copy_(as_source(loaded).read(rows(self.rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj, v_proj merged (shard ids "q", "k", "v"): this rank's query heads, then its KV heads."""

    def __init__(self, hidden: int, shards: ShardSizes, rank: int, dtype: torch.dtype) -> None:
        nq, nk = shards.heads * shards.head_dim, shards.kv_heads * shards.head_dim
        super().__init__(hidden, {"q": (nq, shards.q_rows), "k": (nk, shards.kv_rows), "v": (nk, shards.kv_rows)},
                         rank, dtype)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj merged (shard ids 0 and 1): this rank's intermediate rows of each."""

    def __init__(self, hidden: int, shards: ShardSizes, rank: int, dtype: torch.dtype) -> None:
        part = (shards.intermediate, shards.intermediate_rows)
        super().__init__(hidden, {0: part, 1: part}, rank, dtype)


class RowParallelLinear(PackedWeight, nn.Module):
    """y = x W^T with W's input columns split over ranks: each rank's partial product is all-reduced."""

    def __init__(self, local_in: int, out_features: int, cols: Callable[[int], slice], rank: int,
                 dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        self.rank = rank
        self.cols = cols
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @torch.no_grad()
    def weight_loader(self, param: torch.Tensor, loaded: TensorSource | torch.Tensor,
                      shard_id: Hashable = None) -> None:
        """Copy this rank's columns of the checkpoint tensor into `param`."""
        param.copy_(as_source(loaded).read(None, self.cols(self.rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear(x)
        return self.comm.all_reduce(out) if self.comm else out


def _rank(comm: Communicator | None) -> int:
    return comm.rank if comm else 0


class Attention(nn.Module):
    """GQA self-attention: merged column-parallel QKV, row-parallel o_proj, KV heads sharded or replicated."""

    def __init__(self, hidden: int, shards: ShardSizes, rope: RotaryEmbedding, dtype: torch.dtype,
                 comm: Communicator | None) -> None:
        super().__init__()
        self.heads = shards.heads
        self.kv_heads = shards.kv_heads
        self.head_dim = shards.head_dim
        self.scale = self.head_dim ** -0.5
        self.rope = rope
        self.qkv_proj = QKVParallelLinear(hidden, shards, _rank(comm), dtype)
        self.o_proj = RowParallelLinear(self.heads * self.head_dim, hidden, shards.q_rows, _rank(comm), dtype, comm)
        self.decode_attention: Callable[..., torch.Tensor] = reference.decode_attention  # the kernel set's
        self.rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.rotary  # the kernel set's
        self.store_kv: Callable[..., None] = reference.store_kv  # the kernel set's

    def forward(self, x: torch.Tensor, batch: ForwardBatch, layer: int, cos_sin: tuple) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[:, :nq].view(t, self.heads, self.head_dim)
        k = qkv[:, nq:nq + nk].view(t, self.kv_heads, self.head_dim)
        v = qkv[:, nq + nk:].view(t, self.kv_heads, self.head_dim)
        q, k = self.rotary(q, k, *cos_sin)
        k_cache, v_cache = batch.kv_caches[layer]
        o = paged_attention(q, k, v, k_cache, v_cache, batch.attn, self.scale, self.decode_attention, self.store_kv)
        return self.o_proj(o.reshape(t, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with merged column-parallel gate/up and row-parallel down."""

    def __init__(self, hidden: int, shards: ShardSizes, dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        self.ffn = shards.intermediate
        self.gate_up_proj = MergedColumnParallelLinear(hidden, shards, _rank(comm), dtype)
        self.down_proj = RowParallelLinear(self.ffn, hidden, shards.intermediate_rows, _rank(comm), dtype, comm)
        self.silu_mul: Callable[..., torch.Tensor] = reference.silu_mul  # the kernel set's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # [T, 2 ffn]: this rank's gate rows, then its up rows
        return self.down_proj(self.silu_mul(gu))  # [T, ffn] -> [T, d]


class VocabParallelEmbedding(PackedWeight, nn.Module):
    """Embedding (and tied or untied lm_head) split by vocabulary rows over TP ranks."""

    def __init__(self, shards: ShardSizes, hidden: int, dtype: torch.dtype, comm: Communicator | None) -> None:
        super().__init__()
        rows = shards.vocab_rows(_rank(comm))
        self.vocab = shards.full_vocab
        self.lo, self.hi = rows.start, rows.stop
        self.comm = comm
        self.dtype = dtype
        self.weight = nn.Parameter(torch.zeros(shards.vocab, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @torch.no_grad()
    def weight_loader(self, param: torch.Tensor, loaded: TensorSource | torch.Tensor,
                      shard_id: Hashable = None) -> None:
        """Copy this rank's vocabulary rows; rows past the vocabulary (padding) stay zero."""
        hi = min(self.hi, self.vocab)
        param.zero_()
        if hi > self.lo:
            param[:hi - self.lo].copy_(as_source(loaded).read(slice(self.lo, hi)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return self._rows(ids)
        local = ids - self.lo
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = self._rows(local.clamp(0, self.weight.shape[0] - 1)) * inside.unsqueeze(-1)
        return self.comm.all_reduce(out)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [T, d] in the serving dtype: looked up, or (quantized) the rows' blocks dequantized."""
        if self.quant is None:
            return F.embedding(ids, self.weight)
        return ops.dequantize(self.weight.index_select(0, ids), self.quant, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [S, d] -> fp32 logits [S, vocab]. A quantized head takes h in fp32 (the same values) so its logits are
        the kernel's fp32 sums: rounded to bf16 they move in steps of 1/16-1/8 at typical magnitudes, and near ties
        turn into exact ones (SmolLM2's first answer token: 0.08 nat apart in fp32, equal in bf16)."""
        out = self._linear(h.float() if self.quant is not None else h).float()
        if self.comm is not None:
            out = self.comm.all_gather_last_dim(out)
        return out[:, :self.vocab]
