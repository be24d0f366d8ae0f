"""Paged decode attention: each decode row's single query over its context, read in place from the KV cache.

K/V are read block by block through meta.decode_block_table (slot = block_id * block_size + offset), with
any block size and scattered block ids; nothing is gathered first. One program takes one (row, KV head,
context split) and all GROUP query heads that share the KV head (GQA), so each K/V tile is read once for
the group; an online softmax runs over BLOCK_N tokens at a time.

Split-K (flash-decoding): for long contexts and few rows the context is cut into S splits that run in
parallel; each writes its normalised partial output and log-sum-exp, and a second kernel merges them. One
split writes the output directly.

fp32 runs the dot products in IEEE fp32 (no TF32), as does the interpreter for every dtype (it has no bf16
arithmetic); bf16/fp16 compiled use the tensor cores with fp32 accumulation (the probabilities rounded to the
value dtype for the second product, as flash attention does).
"""

from __future__ import annotations

import torch
import triton.language as tl

from kernels import reference
from kernels.triton.jit import interpreting, kernel, next_pow2, runs_here
from models.context import AttentionMetadata


@kernel
def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, scale, page, head_dim,
                   tokens_per_split,
                   stride_qb, stride_qh, stride_qd, stride_kn, stride_kh, stride_kd, stride_vn, stride_vh, stride_vd,
                   stride_tb, stride_tn, stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   FP32_DOT: tl.constexpr, STORE_LSE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < head_dim
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table_row = table_ptr + b * stride_tb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        blk = tl.load(table_row + (pos // page) * stride_tn, mask=valid, other=0).to(tl.int64)
        slot = blk * page + (pos % page)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid position
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    nonempty = l_i > 0.0  # a split past the row's context holds no token
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=h_mask)


@kernel
def _merge_kernel(mid_ptr, lse_ptr, out_ptr, num_splits, head_dim,
                  stride_mb, stride_mh, stride_ms, stride_md, stride_lb, stride_lh, stride_ls,
                  stride_ob, stride_oh, stride_od, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)  # finite: split 0 holds the row's first token
    w = tl.exp(lse - m)
    w = w / tl.sum(w, axis=0)
    o = tl.load(mid_ptr + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :] * stride_md,
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, res.to(out_ptr.dtype.element_ty),
             mask=d_mask)


SPLIT_MIN_TOKENS = 256  # contexts up to this many tokens run in one split
MAX_SPLITS = 16
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 / H200 (132 SMs)


def num_splits(batch: int, kv_heads: int, max_context: int) -> int:
    """Splits of the context: enough programs to fill the GPU when the rows alone do not."""
    if max_context <= SPLIT_MIN_TOKENS:
        return 1
    by_length = -(-max_context // SPLIT_MIN_TOKENS)
    by_occupancy = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """q [B, H, hd] over the paged caches [num_slots, KV, hd]; block_table [B, nb], context_lens [B]
    (every row >= 1 token). `splits` None: chosen from the batch and the table's width. -> [B, H, hd]."""
    b, h, hd = q.shape
    kv = k_cache.shape[1]
    if h % kv:
        raise ValueError(f"decode attention: {h} query heads do not group over {kv} KV heads")
    group = h // kv
    out = torch.empty((b, h, hd), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    max_context = block_table.shape[1] * block_size  # an upper bound, known without a device sync
    if splits is None:
        splits = num_splits(b, kv, max_context)
    block_d = max(16, next_pow2(hd))
    block_n = 64 if block_d <= 128 else 32
    block_h = max(16, next_pow2(group))  # tl.dot needs 16 rows; the padding heads are masked
    tokens = max(1, -(-max_context // splits))  # per split; a multiple of BLOCK_N when over one tile
    if tokens > block_n:
        tokens = -(-tokens // block_n) * block_n
    splits = -(-max_context // tokens)
    fp32_dot = q.dtype == torch.float32 or interpreting()
    common = dict(GROUP=group, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, FP32_DOT=fp32_dot, num_warps=4)
    args = (q, k_cache, v_cache, block_table, context_lens)
    strides = (q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), block_table.stride(1))
    if splits == 1:
        _decode_kernel[(b, kv, 1)](*args, out, out, scale, block_size, hd, tokens, *strides,
                                   out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0,
                                   STORE_LSE=False, **common)
        return out
    mid = torch.empty((b, h, splits, hd), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(b, kv, splits)](*args, mid, lse, scale, block_size, hd, tokens, *strides,
                                    *mid.stride(), *lse.stride(), STORE_LSE=True, **common)
    _merge_kernel[(b, h)](mid, lse, out, splits, hd, *mid.stride(), *lse.stride(), *out.stride(),
                          BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=block_d, num_warps=4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """kernels.reference.decode_attention, reading K/V in place through meta.decode_block_table and
    meta.decode_context_lens: q [B, H, hd] -> [B, H, hd] in q.dtype."""
    if not runs_here(q) or meta.decode_block_table is None or meta.decode_context_lens is None:
        return reference.decode_attention(q, k_cache, v_cache, meta, scale)
    return paged_decode(q, k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens, meta.block_size,
                        scale)
