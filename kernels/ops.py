"""The op registry: which implementation of each op runs, chosen once at start-up.

    backend = select_backend("auto")            # or "native" / "reference"
    pw = pack_linear(weight, backend)           # once, after the weight_loaders ran
    y = linear(x, pw)                           # every step
    k = kernel_set(backend)                     # the other ops, by name: k.rms_norm(x, w, eps), ...

The ops by name (signatures and semantics: kernels/reference.py, the oracle): linear, rms_norm,
add_rms_norm, attnres_site, attnres_phase1, decode_attention. The model calls these, never a backend.

Backends:

- `reference` (kernels/reference.py): plain PyTorch on the unpacked weight. The oracle for tests and
  the fallback.
- `native` (kernels/cpu.py): oneDNN inner products on weights prepacked once at load.

`auto` means native where it works. `select_backend` probes the native ops once per dtype on a small odd
shape; when they are missing or fail (no oneDNN, a CPU without bf16 support, a changed op schema) it logs
ONE warning and returns the reference backend: a start-up never fails over a kernel. Native ops apply only
to CPU tensors; a weight on another device keeps the reference op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

from kernels import cpu, cpu_gemv, reference

__all__ = ["BACKENDS", "Backend", "KernelSet", "PackedLinear", "kernel_set", "linear", "pack_linear",
           "select_backend"]

logger = logging.getLogger("depthserve.kernels")

BACKENDS = ("auto", "native", "reference")


@dataclass(frozen=True)
class Backend:
    """The implementation chosen for this process: `name` is "native" or "reference"."""

    name: str
    requested: str = "auto"
    reason: str = ""  # why the reference runs although native was requested (empty otherwise)

    @property
    def native(self) -> bool:
        return self.name == "native"

    def describe(self) -> str:
        s = f"kernels: {self.name} (requested {self.requested})"
        return f"{s}; native unavailable: {self.reason}" if self.reason else s


REFERENCE = Backend("reference", "reference")


@dataclass
class PackedLinear:
    """A linear weight prepared for one backend. `weight` is the plain [out, in] parameter (kept for the
    reference path and tests); `packed` its native copy, None when the reference op runs."""

    weight: torch.Tensor
    packed: torch.Tensor | None = None


def _probe(dtype: torch.dtype) -> str | None:
    """None if the native linear runs and matches the reference for `dtype`, else what went wrong."""
    if not cpu.available():
        return "this torch build has no oneDNN linear ops"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(19, 23, generator=g).to(dtype)
        b = torch.randn(19, generator=g).to(dtype)
        x = torch.randn(3, 23, generator=g).to(dtype)
        got = cpu.linear(x, cpu.pack_linear(w), b)
        want = reference.linear(x, w, b)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        if got.shape != want.shape or got.dtype != want.dtype or not torch.allclose(got.float(), want.float(),
                                                                                    rtol=tol, atol=tol):
            return f"{dtype}: the native linear disagrees with the reference"
    except Exception as e:  # noqa: BLE001 - any failure of an optional kernel means: use the reference
        return f"{dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


AUTO_BF16_MAX_THREADS = 4  # "auto" packs bf16 linears only up to this many torch threads (see select_backend)


def select_backend(name: str = "auto", dtypes: Iterable[torch.dtype] = (torch.float32,)) -> Backend:
    """The backend for `name` ("auto" | "native" | "reference") and the weight `dtypes` the model uses.

    Native (for "auto" and "native") when its ops run for every dtype; otherwise the reference, with one
    warning naming the problem. ValueError only for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "reference":
        return REFERENCE
    dtypes = list(dict.fromkeys(dtypes))
    if name == "auto" and torch.bfloat16 in dtypes and torch.get_num_threads() > AUTO_BF16_MAX_THREADS:
        # measured on a 16-core Xeon: packed bf16 linears at batch >= 8 ran 2-4x slower than F.linear at 16
        # threads (2x faster at 2): auto keeps the reference there until a per-shape choice exists
        return Backend("reference", name, f"bf16 at {torch.get_num_threads()} threads: packed linears measured slower")
    for dtype in dtypes:
        problem = _probe(dtype)
        if problem is not None:
            logger.warning("native kernels unavailable, using the reference ops (%s)", problem)
            return Backend("reference", name, problem)
    return Backend("native", name)


def pack_linear(weight: torch.Tensor, backend: Backend) -> PackedLinear:
    """Prepare a [out, in] weight once for `backend` (a packed copy on native CPU; the weight itself otherwise)."""
    if backend.native and weight.device.type == "cpu":
        return PackedLinear(weight, cpu.pack_linear(weight))
    return PackedLinear(weight)


def linear(x: torch.Tensor, pw: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) on whichever form `pw` holds."""
    # HOOK (issue 13, kernels/cpu_gemv.py): small-M linears on the plain weight, fp32 up to 16 rows and bf16
    # up to 64. Inert until the extension loader calls cpu_gemv.enable(); the lead integrates it for real.
    if cpu_gemv.enabled and cpu_gemv.applies(x, pw.weight):
        y = torch.ops.depthserve.small_m_linear(x, pw.weight)
        return y if bias is None else y.add_(bias)
    if pw.packed is None or (x.shape[0] == 1 and x.dtype == torch.float32):
        # fp32 at one row: the reference's GEMV on the plain weight streams it at least as fast as the
        # packed inner product (Xeon, 2 and 16 threads: 1.5x and 1.4x faster; see loadtest/RESULTS.md).
        return reference.linear(x, pw.weight, bias)
    return cpu.linear(x if x.is_contiguous() else x.contiguous(), pw.packed, bias)


@dataclass(frozen=True)
class KernelSet:
    """The non-linear ops of one backend, each with kernels/reference.py's signature and semantics.
    A backend that lacks an op (or cannot run it on the given tensors) uses the reference for it."""

    rms_norm: Callable[..., torch.Tensor] = reference.rms_norm
    add_rms_norm: Callable[..., torch.Tensor] = reference.add_rms_norm
    attnres_site: Callable[..., torch.Tensor] = reference.attnres_site
    attnres_phase1: Callable[..., None] = reference.attnres_phase1
    decode_attention: Callable[..., torch.Tensor] = reference.decode_attention

    def native_ops(self) -> list[str]:
        """Names of the ops this set runs with something other than the reference (for logs and tests)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not getattr(reference, f.name)]


REFERENCE_OPS = KernelSet()


def kernel_set(backend: Backend) -> KernelSet:
    """The ops `backend` runs (the reference set for the reference backend)."""
    del backend  # native non-linear ops: kernels/cpu_ext (issue 13), triton: kernels/triton (issue 14)
    return REFERENCE_OPS
