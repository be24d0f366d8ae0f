"""Reference implementations: plain PyTorch. The oracle every other backend is tested against, and the
fallback when a backend cannot run an op.

The AttnRes math (docs/attnres.md §3-§5) is written here once; models/attn_res.py re-exports it.
Keys: w · (g ⊙ v̂) = (w ⊙ g) · v̂, so with the key norm's gain folded into the query at load, a
source's key is its plain RMS-normalised value v̂ = v / rms(v), computed once when the source completes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.context import AttentionMetadata


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """The reference path keeps the plain [out, in] weight."""
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias). One row (batch-1 decode) goes through mv: on CPU, bf16 GEMV
    streams weights from memory about 1.5x faster than the GEMM path F.linear takes for a single row."""
    if x.shape[0] == 1:
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


# ---- norms ---------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm in Hugging Face's order: normalise in fp32, cast to the weight's dtype, scale.
    x [T, d] (any float dtype, any row stride) -> [T, d] in weight.dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(weight.dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The standard residual step: residual += x (in place, in the residual's dtype), then rms_norm of it.
    x, residual [T, d] -> the normalised [T, d] in weight.dtype."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


# ---- rotary --------------------------------------------------------------------------------------------
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, hd]; cos, sin [T, 1, hd/2] fp32. Rotate halves in fp32 (Hugging Face Llama convention),
    return a new tensor in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary of q [T, H, hd] and k [T, KV, hd] with cos, sin [T, 1, hd/2]: the rotated (q, k). Other backends
    may rotate q and k in place and return them; callers use the returned tensors only."""
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# ---- MLP -----------------------------------------------------------------------------------------------
def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the merged gate/up output: gu [T, 2f] = [gate | up] -> silu(gate) * up [T, f] in
    gu's dtype (in bf16 the silu rounds, then the product: Hugging Face's order). Under tensor parallelism gu is
    a rank's [T, 2 f_local] shard, gate rows then up rows: the same split."""
    f = gu.shape[-1] // 2
    return F.silu(gu[:, :f]) * gu[:, f:]


# ---- KV cache ------------------------------------------------------------------------------------------
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write this step's K and V rows into the paged caches: k, v [T, KV, hd] -> k_cache[slot_mapping[t]],
    v_cache[...] ([num_slots, KV, hd], slots flat: block * block_size + offset). index_copy_'s rules: an empty
    slot_mapping writes nothing, a slot out of range raises, rows that share a slot (the padded decode batch's
    pad rows, all in the scratch block) leave one of them there."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


# ---- AttnRes -------------------------------------------------------------------------------------------
def key_of(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A source's key: RMS-normalised without gain (folded into the queries), fp32: [..., d] -> [..., d]."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


def phase1(states: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every query of a block against all completed blocks in one batched matmul.

    states: [T, n, d] completed blocks; keys: [T, n, d] their keys; queries: [Q, d] fp32 (gains folded).
    Returns per query the log-sum-exp of its scores lse [T, Q] and its normalised mix of the blocks
    xo [T, Q, d] (fp32), written into `out` (depth-pool views) when given. These are the paper's
    (m, l, o) statistics in normalised form: lse = m + log l, xo = o / l.
    """
    s = states.float()
    scores = torch.matmul(keys, queries.t()).transpose(1, 2)  # [T, Q, n]
    lse, xo = out if out is not None else (None, None)
    lse = torch.logsumexp(scores, -1, out=lse)  # [T, Q]
    p = torch.exp(scores - lse.unsqueeze(-1))  # softmax over the blocks, [T, Q, n]
    xo = torch.bmm(p, s, out=xo)  # [T, Q, d]
    return lse, xo


def phase2_fused(lse1: torch.Tensor, xo1: torch.Tensor, partial: torch.Tensor, query: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """Merge Phase-1 statistics with the current partial sum (online softmax over two groups).

    lse1: [T]; xo1: [T, d]; partial: [T, d] fp32; query: [d] fp32 (gain folded). With s2 the partial's
    score, softmax over {blocks, partial} gives the partial the weight e^s2 / (e^lse1 + e^s2) =
    sigmoid(s2 - lse1), and the blocks keep their Phase-1 proportions, so x = lerp(xo1, partial, w): the
    same result as M = max(m1, m2) rescaling, in the fewest kernels. Returns x [T, d] fp32.
    """
    w = torch.sigmoid_((key_of(partial, eps) @ query).sub_(lse1))  # [T]
    return torch.lerp(xo1, partial, w.unsqueeze(-1))  # [T, d]


def mix_sources(states: torch.Tensor, keys: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot mix over n sources with precomputed keys: states, keys [T, n, d] -> (x [T, d] fp32, alpha [T, n])."""
    s = states.float()
    scores = torch.matmul(keys, query)  # [T, n]
    alpha = torch.softmax(scores, dim=-1)
    return torch.bmm(alpha.unsqueeze(1), s).squeeze(1), alpha


def attnres_site(partial: torch.Tensor, delta: torch.Tensor | None, lse1: torch.Tensor, xo1: torch.Tensor,
                 query: torch.Tensor, weight: torch.Tensor, eps: float, accumulate: bool = True) -> torch.Tensor:
    """One Block-AttnRes mixing site that has a partial sum (Phase 2), with the sublayer's input norm.

    partial: [T, d] fp32, updated in place first: partial += delta (accumulate) or partial = delta (a block's
    first sublayer output); delta None leaves it. Then x = phase2_fused(lse1, xo1, partial, query) and the
    result is rms_norm(x, weight): the sublayer's input, [T, d] in weight.dtype.
    lse1: [T], xo1: [T, d] fp32 (strided views of the depth pool are fine); query: [d] fp32, gain folded.
    """
    if delta is not None:
        if accumulate:
            partial.add_(delta)
        else:
            partial.copy_(delta)
    return rms_norm(phase2_fused(lse1, xo1, partial, query, eps), weight, eps)


def attnres_phase1(states: torch.Tensor, keys: torch.Tensor, n: int, queries: torch.Tensor, lse: torch.Tensor,
                   xo: torch.Tensor, eps: float) -> None:
    """A block opens: source n-1 (the partial just closed) gets its key, then Phase 1 of the new block.

    states, keys: [T, n_src, d] fp32 depth pool (n <= n_src completed sources are read); queries: [Q, d] the
    block's stacked queries; lse [T, Q], xo [T, Q, d] written in place. keys[:, :n-1] must hold
    key_of(states[:, :n-1]), as the pool keeps them (the native op scores from the sources instead)."""
    keys[:, n - 1] = key_of(states[:, n - 1], eps)
    phase1(states[:, :n], keys[:, :n], queries, out=(lse, xo))


def attnres_mix(states: torch.Tensor, keys: torch.Tensor, n: int, delta: torch.Tensor | None, query: torch.Tensor,
                weight: torch.Tensor, eps: float, accumulate: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """A one-shot mixing site over the first n sources of the depth pool, with the sublayer's input norm: every
    Full-AttnRes site, and the output head of both modes (whose "sublayer norm" is the final norm).

    Source n-1 completes here: states[:, n-1] += delta (accumulate: the Block partial) or = delta (a Full
    source); delta None leaves it. Its key is written to keys[:, n-1]; the others' keys are read (they must be
    key_of of their sources, as the pool keeps them: the native op scores from the sources instead). Then
    x = mix_sources(states[:, :n], keys[:, :n], query) and the result is rms_norm(x, weight) in weight.dtype.
    states, keys: [T, n_src, d] fp32 pool; delta: [T, d]; query: [d] fp32, gain folded. `rows` ([S] distinct
    row indices, e.g. the logits rows): only those rows are completed and mixed (out [S, d]); the others are
    left as they are. Returns [T or S, d].
    """
    if rows is not None:
        s, k = states[rows, :n], keys[rows, :n]  # [S, n, d] copies; their slot n-1 is written back below
        out = attnres_mix(s, k, n, None if delta is None else delta[rows], query, weight, eps, accumulate)
        states[rows, n - 1] = s[:, n - 1]
        keys[rows, n - 1] = k[:, n - 1]
        return out
    last = states[:, n - 1]  # [T, d]
    if delta is not None:
        if accumulate:
            last.add_(delta)
        else:
            last.copy_(delta)
    keys[:, n - 1] = key_of(last, eps)
    return rms_norm(mix_sources(states[:, :n], keys[:, :n], query)[0], weight, eps)


# ---- attention -----------------------------------------------------------------------------------------
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """Attention of the decode rows (one query each) over their paged context.

    q: [B, H, hd] (B = meta.num_decode); caches: [num_slots, KV, hd]. The reference gathers each row's
    context through meta.decode_gather ([B, C] slots, padded; built from the block table if the runner did not,
    see AttentionMetadata.decode_gather_view) and masks the padding: [B, H, hd]."""
    gather, mask = meta.decode_gather_view()
    b, c = gather.shape
    flat = gather.reshape(-1)  # index_select is much faster than advanced indexing here
    kk = k_cache.index_select(0, flat).view(b, c, *k_cache.shape[1:]).transpose(1, 2)  # [B, KV, C, hd]
    vv = v_cache.index_select(0, flat).view(b, c, *v_cache.shape[1:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k_cache.shape[1])  # [B, H, 1, hd]
    return o.squeeze(2)


# ---- one decoder layer of a pure-decode step (the native backend fuses it: kernels/csrc/decode_layer.cpp) ----
def decode_layer(x: torch.Tensor, weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float, norm_weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None, partial: torch.Tensor | None = None,
                 lse1: torch.Tensor | None = None, xo1: torch.Tensor | None = None, query: torch.Tensor | None = None,
                 accumulate: bool = True) -> torch.Tensor:
    """The MLP output [M, d] of one decoder layer whose M rows are all decode rows, from its normalised input x:
    attention (QKV, rotary, K/V into the cache, paged decode attention, o_proj), the sublayer glue, then the MLP.
    weights = (w_qkv, w_o, w_gate_up, w_down), plain [out, in]. The glue is the standard model's (residual given:
    residual += attention output, then its rms_norm) or Block AttnRes' Phase-2 site (attnres_site on partial,
    lse1, xo1, query). Writes the caches and the residual / partial, as the ops it is made of do."""
    w_qkv, w_o, w_gu, w_down = weights
    m, hd = x.shape[0], k_cache.shape[2]
    kv = k_cache.shape[1]
    h = w_qkv.shape[0] // hd - 2 * kv
    qkv = linear(x, w_qkv)  # [M, (H + 2 KV) hd]
    q = qkv[:, :h * hd].view(m, h, hd)
    k = qkv[:, h * hd:(h + kv) * hd].view(m, kv, hd)
    v = qkv[:, (h + kv) * hd:].view(m, kv, hd)
    q, k = rotary(q, k, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=m, block_size=block_size,
                             decode_block_table=block_table, decode_context_lens=context_lens)
    a = linear(decode_attention(q, k_cache, v_cache, meta, scale).reshape(m, -1), w_o)  # [M, d]
    if residual is not None:
        x2 = add_rms_norm(a, residual, norm_weight, eps)
    else:
        assert partial is not None and lse1 is not None and xo1 is not None and query is not None
        x2 = attnres_site(partial, a, lse1, xo1, query, norm_weight, eps, accumulate)
    return linear(silu_mul(linear(x2, w_gu)), w_down)


def decode_layers(h: torch.Tensor, weights: list[torch.Tensor], norms: list[torch.Tensor], k_caches: list[torch.Tensor],
                  v_caches: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float, eps: float,
                  states: torch.Tensor | None = None, keys: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                  xo: torch.Tensor | None = None, block_queries: list[torch.Tensor] | None = None,
                  site_queries: torch.Tensor | None = None, attn_res_block_size: int = 0) -> torch.Tensor:
    """Every decoder layer of a pure-decode step: the model's loop over decode_layer (weights: 4 per layer,
    norms: input and post-attention per layer), with the glue before each layer. h [M, d] is the embedding.
    Standard (states None): h is the residual stream. Block AttnRes: the depth pool (states[:, 0] already the
    embedding), one [2 block_size, d] query matrix per block and the [L, 2, d] site queries. Returns the last
    layer's MLP output [M, d], not yet added to h / the partial (the caller's output head does that)."""
    n_layers = len(k_caches)

    def layer(i: int, x: torch.Tensor, **glue) -> torch.Tensor:
        return decode_layer(x, weights[4 * i:4 * i + 4], cos, sin, k_caches[i], v_caches[i], slot_mapping, block_table,
                            context_lens, block_size, scale, norms[2 * i + 1], eps, **glue)

    if states is None:
        x = rms_norm(h, norms[0], eps)
        for i in range(n_layers):
            m = layer(i, x, residual=h)
            if i + 1 < n_layers:
                x = add_rms_norm(m, h, norms[2 * i + 2], eps)
        return m
    assert keys is not None and lse is not None and xo is not None and block_queries and site_queries is not None
    bs, n, m = attn_res_block_size, 0, h
    for i in range(n_layers):
        j = i % bs
        if j == 0:  # the pending output closes block n; Phase 1 of the next block
            if i:
                states[:, n] += m
            n += 1
            attnres_phase1(states, keys, n, block_queries[i // bs], lse, xo, eps)
            x = rms_norm(xo[:, 2 * j], norms[2 * i], eps)
        else:
            x = attnres_site(states[:, n], m, lse[:, 2 * j], xo[:, 2 * j], site_queries[i, 0], norms[2 * i], eps)
        m = layer(i, x, partial=states[:, n], lse1=lse[:, 2 * j + 1], xo1=xo[:, 2 * j + 1], query=site_queries[i, 1],
                  accumulate=j != 0)
    return m
