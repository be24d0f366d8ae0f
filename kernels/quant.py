"""Weight-only quantized linears: llama.cpp's block formats, their reference quantizer and dequantizer.

A quantized weight is a uint8 tensor [N, K / 32 * block_bytes]: each row of the plain [N, K] weight is K / 32
blocks of 32 weights, stored exactly as a GGUF file stores them (little-endian fp16 scales, then the quants), so
a GGUF tensor is served as its bytes and a float checkpoint is quantized once at load (`--quantization`):

    q8_0  34 bytes: d (fp16), 32 x int8 q                          w = d * q
    q4_0  18 bytes: d (fp16), 16 bytes of nibbles                  w = d * (q - 8)
    q4_1  20 bytes: d (fp16), m (fp16), 16 bytes of nibbles        w = d * q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high one (ggml's order).
`quantize` is llama.cpp's reference quantizer (quantize_row_*_ref), byte for byte (tests compare it with
gguf-py's); `dequantize` is the oracle the native kernels (kernels/csrc/quant.cpp) are tested against. The
activations stay fp32 or bf16: a linear computes x @ dequantize(w)^T with fp32 accumulation, never
quantizing x (llama.cpp rounds x to 8 bits for its dot products; that is the numerical difference between
the two engines' outputs on the same file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BLOCK", "FORMATS", "QuantFormat", "dequantize", "format_named", "native_available", "quantize",
           "quantized_shape", "reference_linear"]

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


def dequantize(q: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, nb * block_bytes] -> [N, nb * 32] in `dtype` (computed in fp32, rounded once)."""
    n = q.shape[0]
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % fmt.block_bytes:
        raise ValueError(f"not a {fmt.name} tensor: {q.dtype} {list(q.shape)}")
    b = q.reshape(n, -1, fmt.block_bytes)  # [N, nb, bb]
    d = _scales(b, 0)
    if fmt is Q8_0:
        w = d * b[..., 2:].contiguous().view(torch.int8).to(torch.float32)
    else:
        nib = b[..., fmt.block_bytes - 16:]
        vals = torch.cat([nib & 15, nib >> 4], -1).to(torch.float32)  # [N, nb, 32]
        w = d * (vals - 8) if fmt is Q4_0 else d * vals + _scales(b, 2)
    return w.reshape(n, -1).to(dtype)


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
