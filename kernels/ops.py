"""The op registry: which implementation of each op runs, chosen once at start-up.

    backend = select_backend("auto", device=d)  # or "native" / "triton" / "reference"
    pw = pack_linear(weight, backend)           # once, after the weight_loaders ran
    y = linear(x, pw)                           # every step
    k = kernel_set(backend)                     # the other ops, by name: k.rms_norm(x, w, eps), ...

The ops by name (signatures and semantics: kernels/reference.py, the oracle): linear, rms_norm,
add_rms_norm, attnres_site, attnres_phase1, decode_attention. The model calls these, never a backend.

Backends:

- `reference` (kernels/reference.py): plain PyTorch on the unpacked weight. The oracle for tests and
  the fallback.
- `native` (kernels/cpu.py): oneDNN inner products on weights prepacked once at load; decode attention
  through kernels/cpu_attention.py (K/V read in place via the block table) once its op is loaded.
- `triton` (kernels/triton/): Triton kernels for the non-linear ops (norms, AttnRes sites and Phase 1, paged
  decode attention) on CUDA tensors, or in triton's interpreter on CPU tensors when TRITON_INTERPRET=1 (tests).
  Linears stay on the reference (torch) path.

`auto` means triton on a CUDA device (when triton imports and its start-up probe of every op passes), native
elsewhere where it works. `select_backend` probes the native ops once per dtype on a small odd
shape; when they are missing or fail (no oneDNN, a CPU without bf16 support, a changed op schema) it logs
ONE warning and returns the reference backend: a start-up never fails over a kernel. Native ops apply only
to CPU tensors; a weight on another device keeps the reference op. `triton` on a CPU device without the
interpreter, or without an importable triton, is likewise one warning and the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from types import ModuleType

import torch

from kernels import cpu, cpu_attention, reference

__all__ = ["BACKENDS", "Backend", "KernelSet", "PackedLinear", "kernel_set", "linear", "pack_linear",
           "select_backend"]

logger = logging.getLogger("depthserve.kernels")

BACKENDS = ("auto", "native", "reference", "triton")


@dataclass(frozen=True)
class Backend:
    """The implementation chosen for this process: `name` is "native", "triton" or "reference"."""

    name: str
    requested: str = "auto"
    reason: str = ""  # why the reference runs although native/triton was requested (empty otherwise)

    @property
    def native(self) -> bool:
        return self.name == "native"

    def describe(self) -> str:
        s = f"kernels: {self.name} (requested {self.requested})"
        return f"{s}; reference ops because: {self.reason}" if self.reason else s


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


def _import_triton_ops() -> ModuleType:
    """kernels.triton (imports triton itself: only the triton backend, or auto on CUDA, pays for it)."""
    from kernels import triton as tk

    return tk


def _triton_problem(device: torch.device, dtypes: list[torch.dtype]) -> str | None:
    """None if the triton ops can run on `device` (CUDA, or CPU under TRITON_INTERPRET=1) and each of them
    compiles and matches the reference for every dtype (kernels/triton/probe.py); else what went wrong."""
    try:
        tk = _import_triton_ops()
    except Exception as e:  # noqa: BLE001 - no triton (or a broken one) means: use the reference
        return f"triton is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if device.type != "cuda" and not (device.type == "cpu" and tk.interpreting()):
        return f"triton kernels need a CUDA device, or TRITON_INTERPRET=1 on CPU (device: {device.type})"
    if device.type == "cpu" and not tk.library_interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported (set it before the process starts)"
    try:
        for dtype in dtypes:
            problem = tk.probe.problem(device, dtype)
            if problem is not None:
                return problem
    except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or launch means: use the reference
        return f"triton: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def select_backend(name: str = "auto", dtypes: Iterable[torch.dtype] = (torch.float32,),
                   device: str | torch.device | None = None) -> Backend:
    """The backend for `name` ("auto" | "native" | "triton" | "reference"), the weight `dtypes` the model uses
    and the `device` its tensors live on (None: CPU).

    "triton": the triton ops when triton imports and runs on the device (CUDA, or CPU under TRITON_INTERPRET=1).
    "auto": triton on a CUDA device; elsewhere native when its ops run for every dtype. Anything unusable means
    the reference, with one warning naming the problem. ValueError only for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "reference":
        return REFERENCE
    dev = torch.device(device if device is not None else "cpu")
    dtypes = list(dict.fromkeys(dtypes))
    if name == "triton" or (name == "auto" and dev.type == "cuda"):
        problem = _triton_problem(dev, dtypes)
        if problem is not None:
            logger.warning("triton kernels unavailable, using the reference ops (%s)", problem)
            return Backend("reference", name, problem)
        return Backend("triton", name)
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
    # True when decode_attention can be captured in a CUDA graph: fixed shapes, no host sync, reading the block
    # table ([B, max_blocks] at a fixed address) and context lengths in place (the reference gathers a
    # data-dependent context and is not). The engine captures decode graphs only for such a set.
    graph_safe_decode: bool = False

    def native_ops(self) -> list[str]:
        """Names of the ops this set runs with something other than the reference (for logs and tests)."""
        return [f.name for f in fields(self)
                if callable(getattr(self, f.name)) and getattr(self, f.name) is not getattr(reference, f.name)]


REFERENCE_OPS = KernelSet()


def kernel_set(backend: Backend) -> KernelSet:
    """The ops `backend` runs: the triton ops for the triton backend, native CPU ops for native, the reference
    set otherwise."""
    if backend.name == "triton":
        tk = _import_triton_ops()
        return KernelSet(rms_norm=tk.rms_norm, add_rms_norm=tk.add_rms_norm, attnres_site=tk.attnres_site,
                         attnres_phase1=tk.attnres_phase1, decode_attention=tk.decode_attention,
                         graph_safe_decode=True)  # fixed launch shapes from the table's width, no host sync
    if not backend.native:
        return REFERENCE_OPS
    # ---- issue 13: decode attention in place over the paged cache (kernels/cpu_attention.py) ----------------
    # The op is used once some loader registered torch.ops.depthserve.decode_attention; the wrapper falls back
    # to the reference per call for tensors the op does not take (another device, another dtype).
    if cpu_attention.available():
        return KernelSet(decode_attention=cpu_attention.native_decode_attention)
    return REFERENCE_OPS
