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


def free_gib(device: torch.device) -> float:
    """GiB of GPU memory this process may still take: the driver's free memory, capped by
    ``torch.cuda.set_per_process_memory_fraction`` (how ``benchmark --memory_cap_gib`` models a smaller card; the
    driver's figure alone made an 8 GiB-capped run on an 80 GB card keep its UNet on the GPU while the VAE encoded,
    and run out of memory)."""
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    fraction = get_fraction(device) if get_fraction is not None else 1.0
    if fraction < 1.0:
        free = min(free, fraction * total - torch.cuda.memory_reserved(device))
    return max(free, 0) / 2**30
