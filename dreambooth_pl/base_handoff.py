"""One load of the base per fit: the prior sampler leaves its frozen parts for training (issue 26, start-up).

A fit with ``data.priors.generate`` read the SDXL base twice: the prior sampler loaded it (4.5 s on an H100), and
after the draw training loaded the same files again (4.9 s; BENCHMARKS.md 2026-12-06 session 4). Under 16-mixed
both want the fp16 UNet and text encoders on one GPU, and with ``model.vae_dtype: auto`` the VAE in one dtype. So
the sampler, once done, leaves its parts here, restored to what :func:`sdxl.load_parts` returns (its GEGLU patch
undone, its CUDA graphs dropped), and ``load_parts`` takes each part whose key (folder, part, dtype, device) it
would read, instead of reading it again: the same values, since both read the same file into the same dtype.

Parts that the next ``load_parts`` does not take (a bf16-mixed fit, a pivotal run's fp32 text encoders, a
quantized base loaded on the CPU) are released by that call before it reads anything, so two copies of the UNet
never sit on the device together; parts are taken once, and only the fit's own draw leaves any.
"""
from __future__ import annotations

import gc
from typing import Optional

import torch

_left: dict[tuple, object] = {}


def device_name(device) -> str:
    """``device`` as a key: ``cuda`` names the current card's index, None is the CPU."""
    d = torch.device("cpu") if device is None else torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def part_key(root: str, vae: Optional[str], name: str, dtype: Optional[torch.dtype], device) -> tuple:
    """The key of one loaded part: the base folder, the separate VAE (for ``vae`` only), the part's name, dtype
    and device (tokenizers: no dtype, no device)."""
    return str(root), str(vae) if name == "vae" and vae else "", name, str(dtype), \
        device_name(device) if dtype is not None else ""


def leave(parts: dict[tuple, object]) -> None:
    """Leave ``parts`` (key -> part) for the next load; whatever was left before is released."""
    release()
    _left.update(parts)


def take(wanted: dict[str, tuple]) -> dict[str, object]:
    """The left parts whose keys ``wanted`` (name -> key) holds, by name; every other left part is released now,
    before the caller loads the rest."""
    got = {name: _left.pop(key) for name, key in wanted.items() if key in _left}
    release()
    return got


def release() -> None:
    """Drop every left part and give its device memory back."""
    if not _left:
        return
    _left.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def waiting() -> list[tuple]:
    """The keys of the parts left now (what the tests check)."""
    return list(_left)
