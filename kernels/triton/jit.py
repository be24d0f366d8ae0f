"""Kernels compiled (CUDA) or interpreted (TRITON_INTERPRET=1, on CPU tensors), decided per launch.

`triton.jit` reads TRITON_INTERPRET when it decorates: a module decorated at import would be stuck with
whatever the environment said then. `kernel(fn)` defers the decoration to the first launch and keeps one
JIT function per mode, so importing this package early (or setting the variable late, as a test does)
never leaves a compiled kernel facing CPU tensors. Kernels written this way call no jitted function of ours.

Triton's own library functions (tl.sum, tl.max, tl.sigmoid, tl.zeros, ...) are decorated once, when triton
itself is imported: the interpreter works only if TRITON_INTERPRET was set then (`library_interpreted`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

_TRUE = ("1", "true", "yes", "on", "y")  # what triton's getenv_bool accepts


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET set, as triton reads it)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def library_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (its tl.sum & co. then run in the interpreter)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def runs_here(t: torch.Tensor) -> bool:
    """Whether a triton kernel can take `t`: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


class Kernel:
    """A kernel body, jitted on first launch in the current mode: `Kernel(fn)[grid](*args, **constexprs)`."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        mode = interpreting()
        jitted = self._jitted.get(mode)
        if jitted is None:
            import triton

            jitted = self._jitted[mode] = triton.jit(self.fn)
        return jitted[grid]


def kernel(fn: Callable[..., None]) -> Kernel:
    return Kernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
