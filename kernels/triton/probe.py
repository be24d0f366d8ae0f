"""The start-up check of the triton backend: every op once, on tiny odd shapes, against the reference.

A kernel that cannot compile on this machine's triton or GPU, or that computes something else, shows here,
once, before the model loads: kernels.ops then logs one warning and runs the reference (a start-up never
fails over a kernel). Compiling the six kernels costs a few seconds on a GPU; the model's own shapes
compile again at their first use.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.triton import attention, attnres, norm
from models.context import AttentionMetadata


def _close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> str | None:
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: {tuple(got.shape)} {got.dtype} instead of {tuple(want.shape)} {want.dtype}"
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        return f"{name} ({dtype}) disagrees with the reference"
    return None


def problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when every triton op runs on `device` and matches the reference for model dtype `dtype`."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dt).to(device)

    t, d, n_src, q_rows, eps = 3, 23, 3, 4, 1e-6
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device)
    x = rand(t, d, dt=dtype)
    checks = [("rms_norm", norm.rms_norm(x, w, eps), reference.rms_norm(x, w, eps))]
    r1 = rand(t, d, dt=dtype)
    r2 = r1.clone()
    checks.append(("add_rms_norm", norm.add_rms_norm(x, r1, w, eps), reference.add_rms_norm(x, r2, w, eps)))
    states, keys, queries = rand(t, n_src, d), rand(t, n_src, d), rand(q_rows, d)
    lse, xo = rand(t, q_rows), rand(t, q_rows, d)
    k2, lse2, xo2 = keys.clone(), lse.clone(), xo.clone()
    attnres.attnres_phase1(states, keys, 2, queries, lse, xo, eps)
    reference.attnres_phase1(states, k2, 2, queries, lse2, xo2, eps)
    checks += [("attnres_phase1 lse", lse, lse2), ("attnres_phase1 xo", xo, xo2)]
    s2 = states.clone()
    checks.append(("attnres_site", attnres.attnres_site(states[:, 2], x, lse[:, 1], xo[:, 1], queries[0], w, eps),
                   reference.attnres_site(s2[:, 2], x, lse2[:, 1], xo2[:, 1], queries[0], w, eps)))
    s3, k3 = states.clone(), keys.clone()
    picked = torch.tensor([2, 0], device=device)
    checks.append(("attnres_mix", attnres.attnres_mix(states, keys, 3, x, queries[1], w, eps, True, picked),
                   reference.attnres_mix(s3, k3, 3, x, queries[1], w, eps, True, picked)))
    checks.append(("attnres_mix keys", keys, k3))
    # decode: 2 rows, 4 query heads over 2 KV heads, blocks of 3 tokens in reverse order
    bs, lens = 3, [5, 2]
    table = torch.tensor([[3, 1], [2, 0]])
    pos = torch.arange(max(lens))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long, device=device), num_decode=2,
                             block_size=bs, decode_block_table=table.to(device), decode_context_lens=lens_t.to(device),
                             decode_gather=(table[:, pos // bs] * bs + pos % bs).to(device),
                             decode_mask=(pos[None, :] < lens_t[:, None])[:, None, None, :].to(device))
    q, kc, vc = rand(2, 4, 16, dt=dtype), rand(12, 2, 16, dt=dtype), rand(12, 2, 16, dt=dtype)
    want = reference.decode_attention(q, kc, vc, meta, 0.25)
    checks.append(("decode_attention", attention.decode_attention(q, kc, vc, meta, 0.25), want))
    checks.append(("decode_attention split-K", attention.paged_decode(q, kc, vc, meta.decode_block_table,
                                                                      meta.decode_context_lens, bs, 0.25, 2), want))
    for name, got, want in checks:
        bad = _close(name, got, want, dtype)
        if bad is not None:
            return bad
    return None
