"""Safe loading: LoRA weights only from safetensors (loading runs no code); Lightning checkpoints with
``weights_only=True``. A pickle-bearing file is recognised by its bytes, whatever its name, and refused with why."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Literal

import torch

Kind = Literal["safetensors", "pickle", "torch-zip", "empty", "unknown"]
_WHY = ("unpickling runs whatever code the file's author put in it, so weights are only loaded from .safetensors, "
        "which hold plain tensors")


class UnsafeFileError(ValueError):
    """A weights file that could run code when loaded (pickle), or is not the safe format it claims to be."""


def file_kind(path: str | os.PathLike) -> Kind:
    """What ``path`` holds, from its first bytes (never from its name, which anyone can change)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if size == 0:
        return "empty"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container: data.pkl inside
        return "torch-zip"
    if head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5:  # pickle PROTO opcode (legacy torch.save, .pkl)
        return "pickle"
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors"  # u64 header length, then a JSON header
    return "unknown"


def check_safetensors(path: str | os.PathLike, what: str = "LoRA") -> Path:
    """Return ``path`` if it is a well-formed safetensors file; else raise naming the file, the reason and the fix.

    Args:
        path: the file offered as weights.
        what: what the file is for, used in messages (``LoRA``, ``VAE``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist (or is a folder).")
    kind = file_kind(path)
    if kind in ("pickle", "torch-zip"):
        container = "a torch.save zip with a pickle inside" if kind == "torch-zip" else "a Python pickle"
        raise UnsafeFileError(
            f"refusing {what} file {str(path)!r}: it is {container} (.bin/.pt/.ckpt format"
            f"{', despite its .safetensors name' if path.suffix == '.safetensors' else ''}); {_WHY}. Ask its author "
            "for the .safetensors version, or convert it only if you trust its source.")
    if kind != "safetensors":
        reason = "it is empty" if kind == "empty" else "its header is not a safetensors header"
        raise UnsafeFileError(f"{what} file {str(path)!r} is not a safetensors file ({reason}): re-download it or "
                              "export it again.")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise UnsafeFileError(f"{what} file {str(path)!r} is a damaged safetensors file ({e}): re-download or "
                              "export it again.") from e
    return path


def load_safetensors(path: str | os.PathLike, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a checked safetensors file (see :func:`check_safetensors`).

    Args:
        path: the file.
        what: what the file is for, used in messages.
    """
    from safetensors import safe_open

    with safe_open(str(check_safetensors(path, what)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A Lightning ``.ckpt`` read with ``torch.load(weights_only=True)``: tensors and plain data only, no code.

    Args:
        path: checkpoint file.
        map_location: where tensors go.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"refusing checkpoint {str(path)!r}: it holds objects other than tensors and plain data, which "
            f"torch.load(weights_only=True) will not build ({str(e).splitlines()[0]}). Checkpoints written by "
            "this trainer never do; load it with weights_only=False only if you trust its source.") from e
