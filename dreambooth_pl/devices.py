"""Modules moved between devices for a while: the data cache frees encoders from the GPU, and in-training sampling
(callbacks/sample_grid.py) borrows them back. Neutral ground, so neither side imports the other for it."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def to_cpu(*modules: torch.nn.Module) -> None:
    """Move ``modules`` to the CPU and give the GPU memory they held back to the driver's cache."""
    for m in modules:
        m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def borrowed(modules, device: torch.device):
    """Move ``modules`` that are elsewhere onto ``device`` for the block, then each back to where it was: encoders
    the cache freed come back for in-training sampling, and the UNet is parked on the CPU while the VAE encodes.

    Args:
        modules: the modules the block needs on ``device``.
        device: where the block needs them.
    """
    moved = [(m, next(m.parameters()).device) for m in modules if next(m.parameters()).device != device]
    for m, _ in moved:
        m.to(device)
    try:
        yield
    finally:
        for m, home in moved:
            m.to(home)
        if moved and torch.cuda.is_available():
            torch.cuda.empty_cache()
