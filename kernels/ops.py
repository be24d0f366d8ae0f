"""The op registry: which implementation of each op runs, chosen once at start-up.

    backend = select_backend("auto", device=d)  # or "native" / "triton" / "reference"
    pw = pack_linear(weight, backend)           # once, after the weight_loaders ran
    y = linear(x, pw)                           # every step
    k = kernel_set(backend)                     # the other ops, by name: k.rms_norm(x, w, eps), ...

The ops by name (signatures and semantics: kernels/reference.py, the oracle): linear, rms_norm,
add_rms_norm, attnres_site, attnres_phase1, attnres_mix, decode_attention, rotary, silu_mul, store_kv, and
decode_layer / decode_layers (one decoder layer, or every layer, of a pure-decode step; fused only on the native
backend, KernelSet.fused_decode). The model calls these, never a backend.

Backends:

- `reference` (kernels/reference.py): plain PyTorch on the unpacked weight. The oracle for tests and
  the fallback.
- `native` (kernels/cpu.py): oneDNN inner products on weights prepacked once at load, and the C++ ops of
  kernels/csrc (rms_norm, add_rms_norm, attnres_site, attnres_phase1, attnres_mix, rotary, silu_mul, store_kv,
  and decode_attention reading K/V in place through the block table, kernels/cpu_attention.py; built and
  cached by kernels/cpu_ext.py); for pure-decode steps of few rows, decode_layers / decode_layer: every layer
  (or one layer) of the step as ONE C++ call composing those same kernels (kernels/csrc/decode_layer.cpp).
- `triton` (kernels/triton/): Triton kernels for the non-linear ops (norms, AttnRes sites, Phase 1 and mixes, paged
  decode attention) on CUDA tensors, or in triton's interpreter on CPU tensors when TRITON_INTERPRET=1 (tests).
  Linears, rotary, silu_mul and store_kv stay on the reference (torch) path (torch ops: CUDA-graph safe).

`auto` means triton on a CUDA device (when triton imports and its start-up probe of every op passes), native
elsewhere where it works. On the CPU the linears and the other ops are chosen independently, because they
fail independently (oneDNN's bf16 linear needs AVX-512 or AVX-NE-CONVERT; the C++ ops need a compiler once):

- `select_backend` probes the native linears once per dtype on a small odd shape; when they are missing or
  fail (no oneDNN, a CPU without bf16 support, a changed op schema) it logs ONE warning and returns a
  Backend named "reference": `Backend.name` says which linears run.
- `kernel_set` gives the native C++ ops whenever the request was not "reference" (`Backend.native_ops`) and
  the library builds, loads and matches the reference on a probe; otherwise the reference ops, after ONE
  warning (kernels/cpu_ext.py). So a bf16 model on a CPU without oneDNN bf16 runs reference linears and
  native norms, AttnRes ops and decode attention.

A start-up never fails over a kernel. Native ops apply only to CPU tensors; a weight on another device keeps
the reference op. `triton` on a CPU device without the interpreter, or without an importable triton, is
likewise one warning and the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels import cpu, cpu_attention, cpu_gemv, quant, reference
from kernels.quant import QuantFormat, format_named, quantize
from models.context import AttentionMetadata

__all__ = ["BACKENDS", "Backend", "KernelSet", "PackedLinear", "kernel_set", "linear", "pack_linear",
           "probe_native_ops", "select_backend"]

logger = logging.getLogger("depthserve.kernels")

BACKENDS = ("auto", "native", "reference", "triton")


@dataclass(frozen=True)
class Backend:
    """The implementation chosen for this process: `name` ("native", "triton" or "reference") says which
    linears run (oneDNN or torch); on the CPU the other ops follow `native_ops` (see the module docstring)."""

    name: str
    requested: str = "auto"
    reason: str = ""  # why the reference linears/ops run although native/triton was requested (empty otherwise)

    @property
    def native(self) -> bool:
        """The native (oneDNN, prepacked) linears run."""
        return self.name == "native"

    @property
    def native_ops(self) -> bool:
        """The native C++ ops are wanted (kernel_set uses them where they load): every request but "reference",
        whether or not the native linears run."""
        return self.requested != "reference"

    def describe(self) -> str:
        s = f"kernels: {self.name} (requested {self.requested})"
        return f"{s}; fell back because: {self.reason}" if self.reason else s


REFERENCE = Backend("reference", "reference")


@dataclass
class PackedLinear:
    """A linear weight prepared for one backend. `weight` is the plain [out, in] parameter (kept for the
    reference path and tests); `packed` its native copy, None when the reference op runs."""

    weight: torch.Tensor
    packed: torch.Tensor | None = None
    small_m_rows: int = 0  # up to this many rows go to the small-M kernel on `weight` (kernels/cpu_gemv.py)
    upcast: bool = False  # more rows compute in fp32 (a bf16 or quantized weight on a CPU without bf16 GEMM support)
    quant: QuantFormat | None = None  # `weight` is uint8 blocks of this format (kernels/quant.py)
    int8: quant.Int8Weight | None = None  # the blocks repacked for the int8-activation kernel (rows > small_m_rows)


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
            # under auto, bf16 on a CPU without oneDNN bf16 is the expected answer (the C++ ops and the small-M
            # kernel still run): worth a line, not a warning; asked for by name, or any other failure, it is one
            expected = name == "auto" and dtype == torch.bfloat16 and cpu.available()
            logger.log(logging.INFO if expected else logging.WARNING,
                       "native linears unavailable, using the reference linears (%s)", problem)
            return Backend("reference", name, problem)
    return Backend("native", name)


def pack_linear(weight: torch.Tensor, backend: Backend, fmt: QuantFormat | None = None,
                int8_activations: bool = False) -> PackedLinear:
    """Prepare a [out, in] weight once for `backend`: a packed oneDNN copy for the native linears, and the
    number of rows the small-M kernel takes on the plain weight where the native ops run. A quantized weight
    (`fmt`) is used as stored: up to QUANT_MAX_M rows go to the native quantized kernel; with
    `int8_activations`, where the int8 kernel runs, rows past INT8_MIN_M go to it on a repacked copy instead."""
    if fmt is not None:  # rows past the kernel's dequantize into a GEMM: fp32 where the CPU has no bf16 GEMM
        cpu_weight = weight.device.type == "cpu"
        native = backend.native_ops and cpu_weight and _quant_native_ok()
        if native and int8_activations and _int8_native_ok():
            return PackedLinear(weight, None, INT8_MIN_M, False, fmt, quant.pack_int8(weight, fmt))
        return PackedLinear(weight, None, QUANT_MAX_M if native else 0, cpu_weight and not _cpu_bf16_gemm(), fmt)
    small = _small_m_rows(weight, backend)
    if backend.native and weight.device.type == "cpu":
        return PackedLinear(weight, cpu.pack_linear(weight), small)
    upcast = (backend.native_ops and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
              and not _cpu_bf16_gemm())
    return PackedLinear(weight, None, small, upcast)


@functools.cache
def _cpu_bf16_gemm() -> bool:
    """Whether this CPU has native bf16 GEMM (oneDNN's check: AVX-512 BF16 / AMX); without it torch's bf16
    matmuls emulate the format and measured 4-7x slower than fp32 ones (loadtest/RESULTS.md, small-M linear)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: keep bf16


# bf16 rows past which a packed oneDNN weight beats the small-M kernel where the CPU has bf16 dot products
# (AVX512-BF16 / AMX: `_cpu_bf16_gemm`). Measured on a 2-core AVX-512 EPYC, SmolLM2-135M's linears per step, cold
# weights (`python -m loadtest.bench_gemv --models smollm2 --dtype bfloat16 --m 4 8 16 32`): the kernel 1.16x ahead
# at 4 rows, oneDNN 1.07x at 8, 1.56x at 16, 1.98x at 32 (it multiplies bf16 pairs; the kernel converts to fp32
# and FMAs). The cut-off is 8: a pure-decode step of up to 8 rows runs fused (FUSED_DECODE_MAX_ROWS), on this kernel.
BF16_GEMM_MAX_M = 8


def _small_m_rows(weight: torch.Tensor, backend: Backend) -> int:
    """Up to how many rows `linear` sends this weight to depthserve::small_m_linear (0: never)."""
    if not backend.native_ops or weight.device.type != "cpu" or weight.dim() != 2 or not _small_m_linear_ok():
        return 0
    rows = cpu_gemv.MAX_M.get(weight.dtype, 0)
    if weight.dtype == torch.bfloat16 and backend.native and _cpu_bf16_gemm():
        rows = min(rows, BF16_GEMM_MAX_M)
    return rows


@functools.cache
def _small_m_linear_ok() -> bool:
    """The native library loaded, registers small_m_linear, and it matches the reference (once per process)."""
    from kernels import cpu_ext

    if cpu_ext.load() is None or not cpu_gemv.available():  # load() warned
        return False
    try:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(3)
            w, x = torch.randn(37, 61, generator=g).to(dt), torch.randn(3, 61, generator=g).to(dt)
            if not _agrees(torch.ops.depthserve.small_m_linear(x, w), reference.linear(x, w)):
                raise RuntimeError(f"{dt}: differs from the reference")
    except Exception as e:  # noqa: BLE001 - a failing op means: the other linears
        logger.warning("native small-M linear unusable, using the other linears (%s)", e)
        return False
    return True


# Up to this many rows a quantized linear runs the native kernel on the blocks (it streams them once for all
# rows); more rows dequantize the weight (in pieces of QUANT_PIECE_BYTES) and run a GEMM, whose cost the rows
# amortise.
QUANT_MAX_M = 64
QUANT_PIECE_BYTES = 32 << 20


@functools.cache
def _quant_native_ok() -> bool:
    """The native library registers quant_linear and dequantize, and both match kernels/quant.py on a probe."""
    from kernels import cpu_ext

    if cpu_ext.load() is None or not quant.native_available():
        return False
    try:
        g = torch.Generator().manual_seed(4)
        for fmt in quant.FORMATS.values():
            q = quant.quantize(torch.randn(37, 96, generator=g), fmt)
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(3, 96, generator=g).to(dt)
                if not _agrees(torch.ops.depthserve.quant_linear(x, q, fmt.ggml_type), quant.reference_linear(x, q, fmt)):
                    raise RuntimeError(f"{fmt.name} {dt}: quant_linear differs from the reference")
            if not torch.equal(torch.ops.depthserve.dequantize(q, fmt.ggml_type, torch.float32), quant.dequantize(q, fmt)):
                raise RuntimeError(f"{fmt.name}: dequantize differs from the reference")
    except Exception as e:  # noqa: BLE001 - a failing op means: the reference quantized linears
        logger.warning("native quantized linears unusable, using the reference ones (%s)", e)
        return False
    return True


# Past this many rows a quantized linear with int8 activations runs the int8 kernel (kernels/csrc/quant_int8.cpp:
# vpdpbusd multiplies 4x the pairs of an fp32 FMA); up to it the weight-only kernel (in the fused decode layers
# too: FUSED_DECODE_MAX_ROWS = 8), so decode of up to 8 streams keeps x unrounded. Measured on the 2-core Zen 5,
# SmolLM2-135M's linears per decode step, cold weights (`python -m loadtest.bench_quant --int8 --m 1 2 4 8 16 32
# --formats q8_0 q4_1`), speedup over bf16 small_m_linear, weight-only / int8: Q8_0 1.51x / 1.13x at 4 rows,
# 1.32x / 1.72x at 8, 1.20x / 2.48x at 16, 1.12x / 2.97x at 32 (Q4_1 alike).
INT8_MIN_M = 8


@functools.cache
def _int8_native_ok() -> bool:
    """The native library registers int8_linear (built for AVX-512 VNNI) and it matches the reference."""
    if not hasattr(torch.ops.depthserve, "int8_linear"):
        return False
    try:
        g = torch.Generator().manual_seed(4)
        for fmt in quant.FORMATS.values():
            q = quant.quantize(torch.randn(37, 96, generator=g), fmt)
            x = torch.randn(5, 96, generator=g)
            got, want = _int8_linear(x, quant.pack_int8(q, fmt)), quant.int8_reference_linear(x, q, fmt)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"{fmt.name}: int8_linear differs from the reference")
    except Exception as e:  # noqa: BLE001 - a failing op means: the weight-only kernels
        logger.warning("native int8-activation linears unusable, using the weight-only ones (%s)", e)
        return False
    return True


def _int8_linear(x: torch.Tensor, w: quant.Int8Weight) -> torch.Tensor:
    return torch.ops.depthserve.int8_linear(x, w.w8, w.d, w.m, w.n, w.offset)


def dequantize(q: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks [N, nb * block_bytes] -> [N, K] in `dtype`: the native op where it runs, else the reference."""
    if q.device.type == "cpu" and _quant_native_ok():
        return torch.ops.depthserve.dequantize(q, fmt.ggml_type, dtype)
    return quant.dequantize(q, fmt, dtype)


def _quant_linear(x: torch.Tensor, pw: PackedLinear) -> torch.Tensor:
    """x [T, in] @ dequantize(W)^T: the native kernel on the blocks for few rows; else the int8-activation kernel
    where the weight has its copy (`pw.int8`), else the weight dequantized piece by piece into a GEMM (in x's
    dtype, or fp32 where `pw.upcast`)."""
    m, fmt = x.shape[0], pw.quant
    assert fmt is not None
    if 0 < m <= pw.small_m_rows:
        return torch.ops.depthserve.quant_linear(x, pw.weight, fmt.ggml_type)
    if pw.int8 is not None:
        return _int8_linear(x, pw.int8)
    w = pw.weight
    dt = torch.float32 if pw.upcast else x.dtype
    xx = x.to(dt)
    k = w.shape[1] // fmt.block_bytes * quant.BLOCK
    rows = max(1, QUANT_PIECE_BYTES // (k * torch.finfo(dt).bits // 8))
    if rows >= w.shape[0]:
        return F.linear(xx, dequantize(w, fmt, dt)).to(x.dtype)
    out = torch.empty(m, w.shape[0], dtype=x.dtype, device=x.device)
    for lo in range(0, w.shape[0], rows):
        out[:, lo:lo + rows] = F.linear(xx, dequantize(w[lo:lo + rows], fmt, dt))
    return out


def linear(x: torch.Tensor, pw: PackedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) on whichever form `pw` holds: the small-M kernel on the plain weight for up to
    `pw.small_m_rows` rows (kernels/cpu_gemv.py), else the packed oneDNN weight, else the reference; a quantized
    weight through _quant_linear."""
    if pw.quant is not None:
        y = _quant_linear(x, pw)
        return y if bias is None else y.add_(bias)
    if 0 < x.shape[0] <= pw.small_m_rows and x.dtype == pw.weight.dtype:
        y = torch.ops.depthserve.small_m_linear(x, pw.weight)  # [T, out]
        return y if bias is None else y.add_(bias)
    if pw.upcast and x.shape[0] > pw.small_m_rows:
        # bf16 GEMM without CPU bf16 support (no AVX-512 BF16 / AMX) runs ~4-7x slower than fp32's: a prompt
        # chunk computes in fp32 on an upcast copy of the weight (its cost is amortised over the rows).
        return F.linear(x.float(), pw.weight.float(), None if bias is None else bias.float()).to(x.dtype)
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
    attnres_mix: Callable[..., torch.Tensor] = reference.attnres_mix
    decode_attention: Callable[..., torch.Tensor] = reference.decode_attention
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.rotary
    silu_mul: Callable[..., torch.Tensor] = reference.silu_mul
    store_kv: Callable[..., None] = reference.store_kv
    # One whole decoder layer of a pure-decode step (kernels/reference.py: decode_layer). The model calls it only
    # where it is fused (`fused_decode`: the native backend's one C++ call, which returns None for tensors it
    # does not take); elsewhere the per-op path runs, which the reference composes anyway.
    decode_layer: Callable[..., torch.Tensor | None] = reference.decode_layer
    decode_layers: Callable[..., torch.Tensor | None] = reference.decode_layers  # every layer of the step at once
    # True when decode_attention can be captured in a CUDA graph: fixed shapes, no host sync, reading the block
    # table ([B, max_blocks] at a fixed address) and context lengths in place (the reference gathers a
    # data-dependent context and is not). The engine captures decode graphs only for such a set.
    graph_safe_decode: bool = False

    @property
    def needs_decode_gather(self) -> bool:
        """Whether the engine builds the decode gather view (decode_gather, decode_mask) every step: only for the
        reference decode attention. The native and Triton ones read the block table in place; a call they hand
        to the reference (kernels/cpu_attention.py, kernels/triton/attention.py) builds the view from the
        block table then (AttentionMetadata.decode_gather_view), once per step."""
        return self.decode_attention is reference.decode_attention

    @property
    def fused_decode(self) -> bool:
        """Whether decode_layer and decode_layers are fused native calls (worth calling instead of the per-op path)."""
        return self.decode_layer is not reference.decode_layer and self.decode_layers is not reference.decode_layers

    def native_ops(self) -> list[str]:
        """Names of the ops this set runs with something other than the reference (for logs and tests)."""
        return [f.name for f in fields(self)
                if callable(getattr(self, f.name)) and getattr(self, f.name) is not getattr(reference, f.name)]


REFERENCE_OPS = KernelSet()


# ---- the native C++ ops (kernels/csrc via kernels/cpu_ext) ------------------------------------------------
def _probe_runs(name: str) -> list[Callable[[Callable], list[torch.Tensor]]]:
    """Small odd cases for op `name`, each a function that builds its inputs (the same every time), runs the
    given implementation and returns what it produced: the result and the tensors it wrote. d = 67, strided
    views of a depth pool, fp32 and bf16."""
    f32, bf16 = torch.float32, torch.bfloat16
    t, d, q, eps = 3, 67, 6, 1e-6

    def inputs(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(13)
        return [torch.randn(*s, generator=g) for s in shapes]

    runs: list[Callable[[Callable], list[torch.Tensor]]] = []
    for dt in (f32, bf16):
        def weight(dt=dt) -> torch.Tensor:
            return (1 + 0.1 * inputs((d,))[0]).to(dt)

        if name == "rms_norm":
            runs.append(lambda fn, dt=dt: [fn(inputs((t, 2, d))[0].to(dt)[:, 1], weight(dt), eps)])
            runs.append(lambda fn, dt=dt: [fn(inputs((t, 2, d))[0][:, 1], weight(dt), eps)])  # fp32 rows
        elif name == "add_rms_norm":
            def run(fn, dt=dt):
                x, res = (a.to(dt) for a in inputs((t, d), (t, d)))
                return [fn(x, res, weight(dt), eps), res]
            runs.append(run)
        elif name == "attnres_site":
            for has_delta, acc in ((True, True), (True, False), (False, True)):
                def run(fn, dt=dt, has_delta=has_delta, acc=acc):
                    states, delta, lse, xo, query = inputs((t, 4, d), (t, d), (t, q), (t, q, d), (d,))
                    out = fn(states[:, 2], delta.to(dt) if has_delta else None, lse[:, 1], xo[:, 1], query,
                             weight(dt), eps, acc)
                    return [out, states]
                runs.append(run)
        elif name == "rotary":
            def run(fn, dt=dt):
                qkv, cs = inputs((t, 5, d + 1), (t, 1, 12))
                q, k = qkv[:, :3, :24].to(dt), qkv[:, 3:, :24].to(dt)  # strided heads, as the model's views
                out = fn(q, k, cs.cos(), cs.sin())  # the raw op rotates in place, the reference returns new
                return [q, k] if out is None else list(out)
            runs.append(run)
        elif name == "silu_mul":
            runs.append(lambda fn, dt=dt: [fn(inputs((t, 2 * d + 3))[0].mul(4).to(dt)[:, 1:2 * d + 1])])
        elif name == "store_kv":
            def run(fn, dt=dt):
                qkv, k_cache, v_cache = (a.to(dt) for a in inputs((t, 5, 24), (11, 2, 24), (11, 2, 24)))
                fn(qkv[:, 1:3], qkv[:, 3:], k_cache, v_cache, torch.tensor([7, 0, 10]))  # strided views
                return [k_cache, v_cache]
            runs.append(run)
        elif name == "attnres_mix":
            for has_delta, acc, pick in ((True, False, False), (True, True, True), (False, True, False)):
                def run(fn, dt=dt, has_delta=has_delta, acc=acc, pick=pick):
                    states, keys, delta, query = inputs((t, 4, d), (t, 4, d), (t, d), (d,))
                    keys[:, :2] = reference.key_of(states[:, :2], eps)  # the pool's invariant (attnres_mix)
                    rows = torch.tensor([2, 0]) if pick else None
                    out = fn(states, keys, 3, delta.to(dt) if has_delta else None, query, weight(dt), eps, acc, rows)
                    return [out, states, keys]
                runs.append(run)
        elif name == "decode_layer":
            for glue in ("standard", "site"):
                runs.append(functools.partial(_probe_decode_layer, dt=dt, glue=glue))
        elif name == "decode_layers" and dt == f32:  # bf16: decode_layer's probe runs the same kernels in bf16
            for block in (False, True):
                runs.append(functools.partial(_probe_decode_layers, dt=dt, block=block))
        elif name == "attnres_phase1" and dt == f32:
            def run(fn):
                states, keys, queries, lse, xo = inputs((t, 4, d), (t, 4, d), (q, d), (t, q), (t, q, d))
                keys[:, :2] = reference.key_of(states[:, :2], eps)  # the pool's invariant (attnres_phase1)
                fn(states, keys, 3, queries, lse, xo, eps)
                return [keys, lse, xo]
            runs.append(run)
    return runs


def _probe_decode_layer(fn: Callable, dt: torch.dtype, glue: str) -> list[torch.Tensor]:
    """decode_layer on layer 0 of decode_layers_case (3 decode rows, d 67, 6 heads of 24 over 2 KV heads, ffn 37,
    blocks of 5 scattered through the cache, contexts 3, 12 and 7): its output and everything it writes."""
    args, _ = decode_layers_case(dt, block=False, seed=11)
    x, weights, norms, k_caches, v_caches, cos, sin, slots, table, lens, bs, scale, eps = args
    k_cache, v_cache, norm_w = k_caches[0], v_caches[0], norms[1]
    m, d = x.shape
    g = torch.Generator().manual_seed(12)
    if glue == "standard":
        residual = torch.randn(m, d, generator=g).to(dt)
        out = fn(x, weights[:4], cos, sin, k_cache, v_cache, slots, table, lens, bs, scale, norm_w, eps, residual,
                 None, None, None, None, True)
        return [out, k_cache, v_cache, residual]
    partial, lse1, xo1, query = (torch.randn(m, d, generator=g), torch.randn(m, generator=g),
                                 torch.randn(m, d, generator=g), torch.randn(d, generator=g))
    out = fn(x, weights[:4], cos, sin, k_cache, v_cache, slots, table, lens, bs, scale, norm_w, eps, None, partial,
             lse1, xo1, query, True)
    return [out, k_cache, v_cache, partial.to(dt)]  # fp32 partial += a bf16 delta: compared at the delta's tolerance


def decode_layers_case(dt: torch.dtype, block: bool, rows: int = 3, seed: int = 5,
                       quant: Sequence[str | None] | None = None) -> tuple[list, dict]:
    """Inputs of decode_layers (positional, keyword) for a small odd model: 3 layers (Block AttnRes: blocks of 2,
    which do not divide them), d 67, 6 heads of 24 over 2 KV heads, ffn 37, cache blocks of 5 scattered through
    the cache, `rows` (<= 3) decode rows with contexts 3, 12 and 7. The probe's case, and the tests'.
    `quant`: weight-only quantization formats (kernels/quant.py names, None: plain) taken in turn by the 12
    linears (w_qkv, w_o, w_gate_up, w_down per layer); the model is then d 96, 4 heads of 24, ffn 64, whose
    input sizes are multiples of the 32-weight blocks."""
    g = torch.Generator().manual_seed(seed)
    m, d, h, kv, hd, f, bs, n_layers, rb = rows, 67, 6, 2, 24, 37, 5, 3, 2
    if quant is not None:
        d, h, f = 96, 4, 64

    def rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = dt) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    weights, norms = [], []
    for _ in range(n_layers):
        weights += [rand((h + 2 * kv) * hd, d, scale=d ** -0.5), rand(d, h * hd, scale=(h * hd) ** -0.5),
                    rand(2 * f, d, scale=d ** -0.5), rand(d, f, scale=f ** -0.5)]
        norms += [(1 + 0.1 * torch.randn(d, generator=g)).to(dt) for _ in range(2)]
    if quant:
        weights = [w if (name := quant[i % len(quant)]) is None else quantize(w, format_named(name))
                   for i, w in enumerate(weights)]
    k_caches, v_caches = [rand(40, kv, hd) for _ in range(n_layers)], [rand(40, kv, hd) for _ in range(n_layers)]
    table = torch.tensor([[4, 1, 6], [0, 5, 2], [7, 3, 6]])[:m]
    lens = torch.tensor([3, 12, 7], dtype=torch.int32)[:m]
    slots = torch.tensor([table[i, (int(n) - 1) // bs] * bs + (int(n) - 1) % bs for i, n in enumerate(lens)])
    angles = torch.randn(m, 1, hd // 2, generator=g)
    emb = rand(m, d)
    args = [emb, weights, norms, k_caches, v_caches, angles.cos(), angles.sin(), slots, table, lens, bs, 0.2, 1e-6]
    if not block:
        return args, {}
    n_blocks = -(-n_layers // rb)
    states = torch.zeros(n_blocks + 2, m, d).transpose(0, 1)  # source-major, as the depth pool
    states[:, 0] = emb
    q = 2 * rb
    return args, dict(states=states, keys=torch.zeros(n_blocks + 2, m, d).transpose(0, 1), lse=torch.zeros(m, q),
                      xo=torch.zeros(q, m, d).transpose(0, 1),
                      block_queries=[torch.randn(q, d, generator=g) * 0.3 for _ in range(n_blocks)],
                      site_queries=torch.randn(n_layers, 2, d, generator=g) * 0.3, attn_res_block_size=rb)


def _probe_decode_layers(fn: Callable, dt: torch.dtype, block: bool) -> list[torch.Tensor]:
    """decode_layers on decode_layers_case: its output and everything it writes (fp32 pool rows compared at the
    model dtype's tolerance: they sum bf16 sublayer outputs)."""
    args, kw = decode_layers_case(dt, block)
    if "attn_res_block_size" in kw and fn is not reference.decode_layers:  # the raw op: every argument positional
        out = fn(*args, kw["states"], kw["keys"], kw["lse"], kw["xo"], kw["block_queries"], kw["site_queries"],
                 kw["attn_res_block_size"])
    elif fn is not reference.decode_layers:
        out = fn(*args, None, None, None, None, [], None, 0)
    else:
        out = fn(*args, **kw)
    written = [*args[3], *args[4]] + ([args[0]] if not block else [kw["states"].to(dt), kw["xo"].to(dt)])
    return [out, *written]


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    tol = 1e-4 if want.dtype == torch.float32 else 2e-2
    return (got.shape == want.shape and got.dtype == want.dtype
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))


def _probe_op(name: str) -> str | None:
    """None if torch.ops.depthserve.<name> matches the reference on every probe case, else what went wrong."""
    op, ref = getattr(torch.ops.depthserve, name).default, getattr(reference, name)
    try:
        for run in _probe_runs(name):
            if not all(_agrees(g, w) for g, w in zip(run(op), run(ref), strict=True)):
                return "differs from the reference"
    except Exception as e:  # noqa: BLE001 - a failing op means: the reference for it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def probe_native_ops() -> dict[str, str]:
    """What is wrong with each op of the loaded kernels/csrc library, by name ({} when every op matches its
    reference; {"library": why} when it did not load)."""
    from kernels import cpu_ext  # lazily: `python -m kernels.cpu_ext` runs that module as __main__

    if cpu_ext.load() is None:
        return {"library": "not loaded (see the warning)"}
    problems = {name: _probe_op(name) for name in cpu.extension_ops()}
    return {name: p for name, p in problems.items() if p is not None}


# The ops whose kernels decode_layer / decode_layers compose (kernels/csrc/fused.h), besides small_m_linear (which
# the model checks per weight: PackedLinear.small_m_rows).
_FUSED_PARTS = frozenset({"rms_norm", "add_rms_norm", "attnres_site", "attnres_phase1", "rotary", "silu_mul",
                          "store_kv", "decode_attention"})


@functools.cache
def _native_ops() -> KernelSet | None:
    """The KernelSet with every native op that loaded and passed its probe (once per process); None if none."""
    from kernels import cpu_ext

    if cpu_ext.load() is None:  # it warned
        return None
    found = cpu.extension_ops()
    problems = {name: p for name in found if (p := _probe_op(name)) is not None}
    if problems:
        logger.warning("native CPU ops fail their probe, using the reference for them (%s)",
                       "; ".join(f"{k}: {v}" for k, v in problems.items()))
    usable = {k: v for k, v in found.items() if k not in problems}
    if cpu_attention.available():
        problem = _probe_decode_attention()
        if problem is None:
            usable["decode_attention"] = cpu_attention.native_decode_attention
        else:
            logger.warning("native CPU decode attention fails its probe, using the reference for it (%s)", problem)
    if not usable.keys() >= _FUSED_PARTS:  # the fused layer runs their kernels: only with all of them sound
        usable.pop("decode_layer", None)
        usable.pop("decode_layers", None)
    if not usable:
        return None
    logger.info("native CPU ops: %s", ", ".join(usable))
    return KernelSet(**usable)


def _probe_decode_attention() -> str | None:
    """None if the native decode attention matches the reference on a small paged case (GQA 3, odd block size,
    scattered blocks, two context lengths; fp32 and bf16), else what went wrong."""
    try:
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(7)
            bs, lens, tables = 5, [3, 12], [[4, 1, 6], [0, 5, 2]]
            q = torch.randn(2, 6, 24, generator=g).to(dt)
            k_cache, v_cache = (torch.randn(40, 2, 24, generator=g).to(dt) for _ in range(2))
            table = torch.tensor(tables)
            gather = (table.unsqueeze(-1) * bs + torch.arange(bs)).reshape(2, -1)[:, :max(lens)]
            ctx = torch.tensor(lens)
            meta = AttentionMetadata(slot_mapping=torch.zeros(2, dtype=torch.long), num_decode=2, block_size=bs,
                                     decode_block_table=table, decode_context_lens=ctx.to(torch.int32),
                                     decode_gather=gather,
                                     decode_mask=(torch.arange(max(lens)) < ctx.unsqueeze(1))[:, None, None, :])
            got = cpu_attention.native_decode_attention(q, k_cache, v_cache, meta, 0.2)
            if not _agrees(got, reference.decode_attention(q, k_cache, v_cache, meta, 0.2)):
                return f"{dt}: differs from the reference"
    except Exception as e:  # noqa: BLE001 - a failing op means: the reference for it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def kernel_set(backend: Backend, device: torch.device | str = "cpu") -> KernelSet:
    """The non-linear ops for a model on `device` under `backend`: the triton ops for the triton backend; the
    native C++ ops where the backend wants them (Backend.native_ops), the model is on the CPU and the library
    loads; the reference set otherwise."""
    if backend.name == "triton":
        tk = _import_triton_ops()
        return KernelSet(rms_norm=tk.rms_norm, add_rms_norm=tk.add_rms_norm, attnres_site=tk.attnres_site,
                         attnres_phase1=tk.attnres_phase1, attnres_mix=tk.attnres_mix,
                         decode_attention=tk.decode_attention,
                         graph_safe_decode=True)  # fixed launch shapes from the table's width, no host sync
    if not backend.native_ops or torch.device(device).type != "cpu":
        return REFERENCE_OPS
    return _native_ops() or REFERENCE_OPS
