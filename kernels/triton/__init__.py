"""Triton kernels for the GPU path (`--kernels triton`; `auto` on a CUDA device).

Each op takes exactly kernels/reference.py's signature and semantics (the oracle the tests hold them to):

- rms_norm, add_rms_norm (norm.py): one row per program.
- attnres_site (attnres.py): pending add + key/score + sigmoid merge with Phase 1 + input RMSNorm, one kernel.
- attnres_phase1 (attnres.py): the closed source's key + scores/lse/mix of the block's queries, one kernel.
- attnres_mix (attnres.py): a one-shot site (Full AttnRes, the output head): new source + key + mix + norm.
- decode_attention (attention.py): paged, GQA-grouped, online softmax, split-K for long contexts.

The kernels run compiled on CUDA tensors, or in triton's interpreter on CPU tensors when TRITON_INTERPRET=1
(slow: for tests). An op given tensors it cannot take (CPU without the interpreter) runs the reference.
Importing this package needs triton; `kernels.ops` imports it only for the triton backend.
"""

from __future__ import annotations

from kernels.triton import probe
from kernels.triton.attention import decode_attention, paged_decode
from kernels.triton.attnres import attnres_mix, attnres_phase1, attnres_site
from kernels.triton.jit import interpreting, library_interpreted, runs_here
from kernels.triton.norm import add_rms_norm, rms_norm

__all__ = ["add_rms_norm", "attnres_mix", "attnres_phase1", "attnres_site", "decode_attention", "interpreting",
           "library_interpreted", "paged_decode", "probe", "rms_norm", "runs_here"]
