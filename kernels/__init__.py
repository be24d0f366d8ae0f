"""Ops by name, each with a reference PyTorch implementation (the oracle and fallback) and, where one
pays, a native CPU implementation. `kernels.ops` is the registry the model calls; see its docstring."""

from kernels.ops import (
    BACKENDS,
    Backend,
    KernelSet,
    PackedLinear,
    kernel_set,
    linear,
    pack_linear,
    select_backend,
)

__all__ = ["BACKENDS", "Backend", "KernelSet", "PackedLinear", "kernel_set", "linear", "pack_linear", "select_backend"]
