"""Block AttnRes depth mixing (docs/attnres.md §5): one kernel per mixing site, one per block opening.

attnres_site, a tile of whole token rows per program: the pending sublayer output joins the partial sum (stored back
into the depth pool), the partial's key and score, the sigmoid merge with the Phase-1 statistics, the
sublayer's input RMSNorm and gain; the row is read once.

attnres_phase1, one program per token row: the closed source's key (stored), the scores of the block's Q
queries over the n completed sources, their log-sum-exp and the softmax mix of the sources. It walks d in
chunks three times (the closed source's mean square; keys -> scores; sources -> mix), holding the
[Q, n] scores in registers; everything is fp32 (the depth pool's dtype).

attnres_mix, one program per (picked) token row: a one-shot site over the first n sources (Full AttnRes, and
the output head): the completed source (delta joined, stored), its key (stored) and the n scores, then the
softmax mix and the sublayer's input norm, walking d in chunks four times (the mix is recomputed for the norm
rather than kept in a second fp32 buffer).
"""

from __future__ import annotations

import torch
import triton.language as tl

from kernels import reference
from kernels.triton.jit import kernel, next_pow2, runs_here
from kernels.triton.norm import row_tiling


@kernel
def _site_kernel(partial_ptr, delta_ptr, lse_ptr, xo_ptr, q_ptr, w_ptr, out_ptr, t_rows, d,
                 stride_pt, stride_pd, stride_dt, stride_dd, stride_l, stride_xt, stride_xd, stride_q, stride_w,
                 stride_ot, eps, HAS_DELTA: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < t_rows
    col_mask = cols < d
    mask = row_mask[:, None] & col_mask[None, :]
    p_ptrs = partial_ptr + rows[:, None] * stride_pt + cols[None, :] * stride_pd
    if HAS_DELTA:
        delta = tl.load(delta_ptr + rows[:, None] * stride_dt + cols[None, :] * stride_dd, mask=mask,
                        other=0.0).to(tl.float32)
        if ACCUMULATE:  # noqa: SIM108 - a constexpr branch: only one side is compiled
            p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32) + delta
        else:
            p = delta
        tl.store(p_ptrs, p, mask=mask)
    else:
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    # the partial's key (RMS-normalised; the gain is folded into the query) and its score
    key = p * (1.0 / tl.sqrt(tl.sum(p * p, axis=1) / d + eps))[:, None]
    q = tl.load(q_ptr + cols * stride_q, mask=col_mask, other=0.0).to(tl.float32)
    score = tl.sum(key * q[None, :], axis=1)
    lse1 = tl.load(lse_ptr + rows * stride_l, mask=row_mask, other=0.0).to(tl.float32)
    w = tl.sigmoid(score - lse1)[:, None]
    # x = lerp(xo1, partial, w), in torch.lerp's two-sided form
    xo = tl.load(xo_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0)
    xo = xo.to(tl.float32)
    diff = p - xo
    x = tl.where(w < 0.5, xo + w * diff, p - diff * (1.0 - w))
    # the sublayer's input norm
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
    y = (x * inv[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    y = y * tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _phase1_kernel(states_ptr, keys_ptr, queries_ptr, lse_ptr, xo_ptr, n, num_q, d,
                   stride_st, stride_sn, stride_sd, stride_kt, stride_kn, stride_kd, stride_qq, stride_qd,
                   stride_lt, stride_lq, stride_xt, stride_xq, stride_xd, eps,
                   BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < num_q
    last = n - 1  # the source closed now: its key is computed here
    s_row = states_ptr + t * stride_st
    k_row = keys_ptr + t * stride_kt
    # 1. mean square of the closed source
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dm = d0 + offs_d < d
        v = tl.load(s_row + last * stride_sn + (d0 + offs_d) * stride_sd, mask=dm, other=0.0).to(tl.float32)
        sq += v * v
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / d + eps)
    # 2. its key (stored), and the scores of every query over sources 0 .. n-1
    scores = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        dm = cols < d
        v = tl.load(s_row + last * stride_sn + cols * stride_sd, mask=dm, other=0.0).to(tl.float32)
        key = v * inv
        tl.store(k_row + last * stride_kn + cols * stride_kd, key, mask=dm)
        old = (offs_n < last)[:, None] & dm[None, :]
        kt = tl.load(k_row + offs_n[:, None] * stride_kn + cols[None, :] * stride_kd, mask=old, other=0.0)
        kt = tl.where((offs_n == last)[:, None], key[None, :], kt.to(tl.float32))
        qt = tl.load(queries_ptr + offs_q[:, None] * stride_qq + cols[None, :] * stride_qd,
                     mask=q_mask[:, None] & dm[None, :], other=0.0).to(tl.float32)
        scores += tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)
    scores = tl.where((offs_n < n)[None, :], scores, float("-inf"))
    m = tl.max(scores, axis=1)
    lse = m + tl.log(tl.sum(tl.exp(scores - m[:, None]), axis=1))
    tl.store(lse_ptr + t * stride_lt + offs_q * stride_lq, lse, mask=q_mask)
    p = tl.exp(scores - lse[:, None])  # [BLOCK_Q, BLOCK_N]; 0 beyond n
    # 3. the softmax mix of the sources, per query
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        dm = cols < d
        st = tl.load(s_row + offs_n[:, None] * stride_sn + cols[None, :] * stride_sd,
                     mask=(offs_n < n)[:, None] & dm[None, :], other=0.0).to(tl.float32)
        mix = tl.sum(p[:, :, None] * st[None, :, :], axis=1)  # [BLOCK_Q, BLOCK_D]
        tl.store(xo_ptr + t * stride_xt + offs_q[:, None] * stride_xq + cols[None, :] * stride_xd, mix,
                 mask=q_mask[:, None] & dm[None, :])


def attnres_site(partial: torch.Tensor, delta: torch.Tensor | None, lse1: torch.Tensor, xo1: torch.Tensor,
                 query: torch.Tensor, weight: torch.Tensor, eps: float, accumulate: bool = True) -> torch.Tensor:
    """kernels.reference.attnres_site in one kernel: partial [T, d] fp32 updated in place (+= delta, or = delta
    when not accumulate; delta None leaves it), then rms_norm(lerp(xo1, partial, w), weight) in weight.dtype."""
    if not runs_here(partial):
        return reference.attnres_site(partial, delta, lse1, xo1, query, weight, eps, accumulate)
    t, d = partial.shape
    out = torch.empty((t, d), dtype=weight.dtype, device=partial.device)
    if t == 0:
        return out
    has_delta = delta is not None
    dl = delta if has_delta else partial  # a placeholder pointer, never read
    grid, block_t, block_d, warps = row_tiling(t, d)
    _site_kernel[(grid,)](partial, dl, lse1, xo1, query, weight, out, t, d,
                          partial.stride(0), partial.stride(1), dl.stride(0), dl.stride(1), lse1.stride(0),
                          xo1.stride(0), xo1.stride(1), query.stride(0), weight.stride(0), out.stride(0), eps,
                          HAS_DELTA=has_delta, ACCUMULATE=bool(accumulate), BLOCK_T=block_t, BLOCK_D=block_d,
                          num_warps=warps)
    return out


PHASE1_TILE = 8192  # elements of the [Q, n, d-chunk] product tile one program holds


def attnres_phase1(states: torch.Tensor, keys: torch.Tensor, n: int, queries: torch.Tensor, lse: torch.Tensor,
                   xo: torch.Tensor, eps: float) -> None:
    """kernels.reference.attnres_phase1: keys[:, n-1] = key of states[:, n-1]; lse [T, Q] and xo [T, Q, d] of
    the Q queries over sources 0 .. n-1, written in place."""
    if not runs_here(states):
        return reference.attnres_phase1(states, keys, n, queries, lse, xo, eps)
    t, n_src, d = states.shape
    q = queries.shape[0]
    if t == 0:
        return None
    if not 1 <= n <= n_src:
        raise ValueError(f"attnres_phase1: n={n} outside 1..{n_src}")
    block_q, block_n = max(2, next_pow2(q)), max(2, next_pow2(n_src))
    block_d = max(16, min(next_pow2(d), PHASE1_TILE // (block_q * block_n)))
    _phase1_kernel[(t,)](states, keys, queries, lse, xo, n, q, d,
                         states.stride(0), states.stride(1), states.stride(2), keys.stride(0), keys.stride(1),
                         keys.stride(2), queries.stride(0), queries.stride(1), lse.stride(0), lse.stride(1),
                         xo.stride(0), xo.stride(1), xo.stride(2), eps,
                         BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return None


@kernel
def _mix_kernel(states_ptr, keys_ptr, delta_ptr, rows_ptr, q_ptr, w_ptr, out_ptr, n, d,
                stride_st, stride_sn, stride_sd, stride_kt, stride_kn, stride_kd, stride_dt, stride_dd, stride_r,
                stride_q, stride_w, stride_ot, eps, HAS_DELTA: tl.constexpr, ACCUMULATE: tl.constexpr,
                HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:  # noqa: SIM108 - a constexpr branch: only one side is compiled
        t = tl.load(rows_ptr + pid * stride_r).to(tl.int64)
    else:
        t = pid
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    last = n - 1  # the source completed now
    s_row = states_ptr + t * stride_st
    k_row = keys_ptr + t * stride_kt
    # 1. the completed source (delta joined and stored) and its mean square
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        dm = cols < d
        v_ptrs = s_row + last * stride_sn + cols * stride_sd
        if HAS_DELTA:
            dl = tl.load(delta_ptr + t * stride_dt + cols * stride_dd, mask=dm, other=0.0).to(tl.float32)
            if ACCUMULATE:  # noqa: SIM108 - a constexpr branch
                v = tl.load(v_ptrs, mask=dm, other=0.0).to(tl.float32) + dl
            else:
                v = dl
            tl.store(v_ptrs, v, mask=dm)
        else:
            v = tl.load(v_ptrs, mask=dm, other=0.0).to(tl.float32)
        sq += v * v
    tl.debug_barrier()  # the stored source is read back below, in other layouts
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / d + eps)
    # 2. its key (stored), and the scores of sources 0 .. n-1
    scores = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        dm = cols < d
        key = tl.load(s_row + last * stride_sn + cols * stride_sd, mask=dm, other=0.0).to(tl.float32) * inv
        tl.store(k_row + last * stride_kn + cols * stride_kd, key, mask=dm)
        old = (offs_n < last)[:, None] & dm[None, :]
        kt = tl.load(k_row + offs_n[:, None] * stride_kn + cols[None, :] * stride_kd, mask=old, other=0.0)
        kt = tl.where((offs_n == last)[:, None], key[None, :], kt.to(tl.float32))
        q = tl.load(q_ptr + cols * stride_q, mask=dm, other=0.0).to(tl.float32)
        scores += tl.sum(kt * q[None, :], axis=1)
    scores = tl.where(offs_n < n, scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=0))
    p = p / tl.sum(p, axis=0)  # [BLOCK_N]; 0 beyond n
    # 3. the mix's mean square; 4. the mix again, normalised, times the gain
    xs = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        st = tl.load(s_row + offs_n[:, None] * stride_sn + cols[None, :] * stride_sd,
                     mask=(offs_n < n)[:, None] & (cols < d)[None, :], other=0.0).to(tl.float32)
        x = tl.sum(p[:, None] * st, axis=0)
        xs += x * x
    rx = 1.0 / tl.sqrt(tl.sum(xs, axis=0) / d + eps)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + offs_d
        dm = cols < d
        st = tl.load(s_row + offs_n[:, None] * stride_sn + cols[None, :] * stride_sd,
                     mask=(offs_n < n)[:, None] & dm[None, :], other=0.0).to(tl.float32)
        y = (tl.sum(p[:, None] * st, axis=0) * rx).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = y * tl.load(w_ptr + cols * stride_w, mask=dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid * stride_ot + cols, y.to(out_ptr.dtype.element_ty), mask=dm)


MIX_TILE = 8192  # elements of the [n, d-chunk] tile one program holds


def attnres_mix(states: torch.Tensor, keys: torch.Tensor, n: int, delta: torch.Tensor | None, query: torch.Tensor,
                weight: torch.Tensor, eps: float, accumulate: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.reference.attnres_mix: source n-1 of the pool += / = delta, its key, then rms_norm of the softmax
    mix of sources 0 .. n-1 in weight.dtype; [T, d], or [S, d] for the rows picked by `rows` (distinct)."""
    if not runs_here(states):
        return reference.attnres_mix(states, keys, n, delta, query, weight, eps, accumulate, rows)
    t, n_src, d = states.shape
    if not 1 <= n <= n_src:
        raise ValueError(f"attnres_mix: n={n} outside 1..{n_src}")
    count = t if rows is None else rows.shape[0]
    out = torch.empty((count, d), dtype=weight.dtype, device=states.device)
    if count == 0:
        return out
    dl = delta if delta is not None else states[:, 0]  # a placeholder pointer, never read
    rw = rows if rows is not None else states  # likewise
    block_n = max(2, next_pow2(n_src))
    block_d = max(16, min(next_pow2(d), MIX_TILE // block_n))
    _mix_kernel[(count,)](states, keys, dl, rw, query, weight, out, n, d,
                          states.stride(0), states.stride(1), states.stride(2), keys.stride(0), keys.stride(1),
                          keys.stride(2), dl.stride(0), dl.stride(1), rw.stride(0), query.stride(0),
                          weight.stride(0), out.stride(0), eps, HAS_DELTA=delta is not None,
                          ACCUMULATE=bool(accumulate), HAS_ROWS=rows is not None, BLOCK_N=block_n, BLOCK_D=block_d,
                          num_warps=4)
    return out
