"""Weight-only quantized linears: llama.cpp's block formats, their reference quantizer and dequantizer.

A quantized weight is a uint8 tensor [N, K / 32 * block_bytes]: each row of the plain [N, K] weight is K / 32
blocks of 32 weights, stored exactly as a GGUF file stores them (little-endian fp16 scales, then the quants), so
a GGUF tensor is served as its bytes and a float checkpoint is quantized once at load (`--quantization`):

    q8_0  34 bytes: d (fp16), 32 x int8 q                          w = d * q
    q4_0  18 bytes: d (fp16), 16 bytes of nibbles                  w = d * (q - 8)
    q4_1  20 bytes: d (fp16), m (fp16), 16 bytes of nibbles        w = d * q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high one (ggml's order).
`quantize` is llama.cpp's reference quantizer (quantize_row_*_ref), byte for byte (tests compare it with
gguf-py's); `dequantize` is the oracle the native kernels (kernels/csrc/quant.cpp) are tested against. There
the activations stay fp32 or bf16: a linear computes x @ dequantize(w)^T with fp32 accumulation.

The int8-activation linears (kernels/csrc/quant_int8.cpp, for steps of many rows where the CPU has AVX-512
VNNI) round x to int8 blocks too, as llama.cpp does for all its quantized dot products: `quantize_activations`
and `int8_reference_linear` are their contract, `pack_int8` the weight layout they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK", "FORMATS", "Int8Weight", "QuantFormat", "dequantize", "format_named", "int8_reference_linear",
           "native_available", "pack_int8", "quantize", "quantize_activations", "quantized_shape", "reference_linear"]

BLOCK = 32  # weights per block, every format


@dataclass(frozen=True)
class QuantFormat:
    """One block format: its name (the --quantization value), ggml type id and bytes per block of 32."""

    name: str
    ggml_type: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / BLOCK


Q8_0 = QuantFormat("q8_0", 8, 34)
Q4_0 = QuantFormat("q4_0", 2, 18)
Q4_1 = QuantFormat("q4_1", 3, 20)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (Q8_0, Q4_0, Q4_1)}
BY_GGML_TYPE: dict[int, QuantFormat] = {f.ggml_type: f for f in FORMATS.values()}


def format_named(name: str) -> QuantFormat:
    """The format for a --quantization value (q8_0, q4_0, q4_1; int8 is q8_0). ValueError names the choices."""
    key = {"int8": "q8_0"}.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown quantization {name!r}; choose one of int8, {', '.join(FORMATS)}")
    return FORMATS[key]


def quantized_shape(n: int, k: int, fmt: QuantFormat) -> tuple[int, int]:
    """[N, K] -> the uint8 shape of its quantized form. ValueError unless K is a multiple of 32."""
    if k % BLOCK:
        raise ValueError(f"{fmt.name} needs an input size that is a multiple of {BLOCK}; got {k}")
    return n, k // BLOCK * fmt.block_bytes


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[..., 1] fp32 -> [..., 2] uint8, the little-endian fp16 bytes."""
    return v.to(torch.float16).view(torch.uint8)


def quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[N, K] float -> uint8 [N, K / 32 * block_bytes], llama.cpp's reference quantizer (computed in fp32)."""
    n, k = w.shape
    quantized_shape(n, k, fmt)
    x = w.detach().to(torch.float32).reshape(n, k // BLOCK, BLOCK)  # [N, nb, 32]
    if fmt is Q8_0:
        d = x.abs().amax(-1, keepdim=True) / 127  # [N, nb, 1]
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_away(x * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], -1).reshape(n, -1)
    if fmt is Q4_0:
        # the signed value of largest magnitude (its first occurrence) maps to -8
        idx = x.abs().argmax(-1, keepdim=True)
        d = x.gather(-1, idx) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)
        extra = [_fp16_bytes(d)]
    elif fmt is Q4_1:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.clamp(torch.trunc((x - lo) * inv + 0.5), max=15).to(torch.uint8)
        extra = [_fp16_bytes(d), _fp16_bytes(lo)]
    else:
        raise ValueError(f"unknown format {fmt}")
    packed = q[..., :16] | (q[..., 16:] << 4)  # [N, nb, 16]
    return torch.cat([*extra, packed], -1).reshape(n, -1)


def _scales(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block [N, nb, bb] -> fp32 [N, nb, 1]."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _unpack(q: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 [N, nb * block_bytes] -> the integer quants [N, nb, 32] (int16: Q8_0's q, Q4_0's q - 8, Q4_1's q),
    the block scales d and (Q4_1) mins m, fp32 [N, nb, 1]: w = d * quant (+ m)."""
    n = q.shape[0]
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % fmt.block_bytes:
        raise ValueError(f"not a {fmt.name} tensor: {q.dtype} {list(q.shape)}")
    b = q.reshape(n, -1, fmt.block_bytes)  # [N, nb, bb]
    if fmt is Q8_0:
        return b[..., 2:].contiguous().view(torch.int8).to(torch.int16), _scales(b, 0), None
    nib = b[..., fmt.block_bytes - 16:]
    vals = torch.cat([nib & 15, nib >> 4], -1).to(torch.int16)  # [N, nb, 32]
    return (vals - 8, _scales(b, 0), None) if fmt is Q4_0 else (vals, _scales(b, 0), _scales(b, 2))


def dequantize(q: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, nb * block_bytes] -> [N, nb * 32] in `dtype` (computed in fp32, rounded once)."""
    vals, d, m = _unpack(q, fmt)
    w = d * vals.to(torch.float32)
    if m is not None:
        w = w + m
    return w.reshape(q.shape[0], -1).to(dtype)


def reference_linear(x: torch.Tensor, q: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """x [M, K] @ dequantize(q)^T in fp32, rounded once to x's dtype: what every quantized linear computes."""
    return (x.to(torch.float32) @ dequantize(q, fmt).T).to(x.dtype)


# ---- the native kernels (kernels/csrc/quant.cpp; kernels.ops dispatches to them, probed once) ----------------

def native_available() -> bool:
    """True once the native library that registers depthserve::quant_linear is loaded in this process."""
    try:
        return hasattr(torch.ops.depthserve, "quant_linear")
    except (AttributeError, RuntimeError):
        return False


# ---- int8 activations (kernels/csrc/quant_int8.cpp) ---------------------------------------------------------

@dataclass(frozen=True)
class Int8Weight:
    """A quantized weight repacked once for the int8-activation kernel (vpdpbusd's layout).

    w8: uint8 [G, nb, 8, 16, 4] for G = ceil(N / 16) groups of 16 rows: per group and block, 8 vectors of
    4 consecutive quants of the 16 rows, each stored as quant + offset (offset 128 where quants are signed:
    vpdpbusd multiplies unsigned by signed bytes). d, m: fp32 [G, nb, 16], the block scales and (Q4_1) mins,
    else an empty m. Padding rows are zero."""

    w8: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    n: int
    k: int
    offset: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w8, self.d, self.m))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts on a 64-byte boundary (the kernel's aligned vector loads)."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)
    start = -raw.data_ptr() % 64
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def pack_int8(q: torch.Tensor, fmt: QuantFormat) -> Int8Weight:
    """uint8 [N, nb * block_bytes] blocks -> the Int8Weight the int8-activation kernel reads."""
    vals, d, m = _unpack(q, fmt)  # [N, nb, 32], [N, nb, 1]
    n, nb = vals.shape[:2]
    offset = 0 if fmt is Q4_1 else 128
    g = -(-n // 16)
    pad = g * 16 - n
    u = torch.nn.functional.pad((vals + offset).to(torch.uint8), (0, 0, 0, 0, 0, pad))  # [G*16, nb, 32]
    w8 = u.view(g, 16, nb, 8, 4).permute(0, 2, 3, 1, 4)  # [G, nb, 8, 16, 4]

    def per_group(s: torch.Tensor) -> torch.Tensor:  # [N, nb, 1] -> [G, nb, 16]
        return torch.nn.functional.pad(s.squeeze(-1), (0, 0, 0, pad)).view(g, 16, nb).permute(0, 2, 1)

    mins = per_group(m) if m is not None else torch.empty(0)
    return Int8Weight(_aligned(w8), _aligned(per_group(d)), _aligned(mins) if m is not None else mins, n,
                      nb * BLOCK, offset)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> its int8 blocks: q int8 [M, K / 32, 32] and scales fp32 [M, K / 32, 1], x ~ d * q.

    Per block of 32: d = amax / 127 and q = x * (127 / amax) rounded half to even (0 where amax is 0); llama.cpp's
    Q8_0 rounding of activations, but with fp32 scales (llama.cpp stores d as fp16)."""
    m, k = x.shape
    xb = x.to(torch.float32).reshape(m, k // BLOCK, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(xb * inv).to(torch.int8), amax / 127


def int8_reference_linear(x: torch.Tensor, q: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """What int8_linear computes, in float64 (the kernel's fp32 sum of block terms differs by its rounding only):
    y[m, n] = sum_b d_w d_x sum_k qw qx (+ m_w d_x sum_k qx), in x's dtype."""
    qx, dx = quantize_activations(x)  # [M, nb, 32], [M, nb, 1]
    vals, dw, mw = _unpack(q, fmt)  # [N, nb, 32], [N, nb, 1]
    isum = torch.einsum("mbk,nbk->mnb", qx.double(), vals.double())  # exact: |sum| < 2^53
    y = (isum * (dx.squeeze(-1).double()[:, None, :] * dw.squeeze(-1).double()[None])).sum(-1)
    if mw is not None:
        sx = qx.double().sum(-1) * dx.squeeze(-1).double()  # [M, nb]
        y = y + sx @ mw.squeeze(-1).double().T
    return y.to(x.dtype)
