"""One launch of a Triton kernel, or only its build where the arguments are meta tensors (kernel_warmup.py).

Triton's ``JITFunction.warmup`` builds a kernel for its arguments' dtypes, alignments and integer sizes as their
first launch would, without running it; meta tensors have dtypes, strides and a null (aligned) pointer, so the
kernel files' own argument code, run on them, builds exactly what a real call would launch.
"""
from __future__ import annotations


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; for a meta first argument, ``kernel.warmup`` (build only)."""
    if args[0].is_meta:
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
