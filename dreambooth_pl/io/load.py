"""Safe loading: LoRA weights only from safetensors (loading runs no code); checkpoints with ``weights_only=True``.

A file's kind is read from its bytes, whatever its name. Damaged files (empty, truncated, garbage) and files that
could run code are refused with a message naming the file and the fix; no message suggests ``weights_only=False``.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # annotations only: torch is imported where a checkpoint is read
    import torch

Kind = Literal["safetensors", "pickle", "torch-zip", "empty", "unknown"]
_WHY = ("unpickling runs whatever code the file's author put in it, so weights are only loaded from .safetensors, "
        "which hold plain tensors")


class UnsafeFileError(ValueError):
    """A weights file that could run code when loaded (pickle), or is not the safe format it claims to be."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (empty, truncated, garbage or holding code); the message says what to do."""


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
    except (SafetensorError, json.JSONDecodeError, OSError, RecursionError) as e:
        raise UnsafeFileError(f"{what} file {str(path)!r} is a damaged safetensors file ({e}): re-download or "
                              "export it again.") from e
    return path


def load_safetensors(path: str | os.PathLike, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a checked safetensors file (see :func:`check_safetensors`).

    Args:
        path: the file.
        what: what the file is for, used in messages.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(check_safetensors(path, what)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:  # a header that promises more bytes than the file holds: truncated
        raise UnsafeFileError(f"{what} file {str(path)!r} is truncated or damaged ({e}): re-download or export it "
                              "again.") from None


def parse_json(text: str, source: str) -> Any:
    """``json.loads`` that names ``source`` when the text is invalid or nested too deeply to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON ({e}); the file was damaged or not written by a LoRA tool: "
                         "export it again.") from None
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply to read; the file was not written by a LoRA tool: "
                         "export it again.") from None


def read_json(path: str | os.PathLike, what: str = "file", keys: tuple[str, ...] = ()) -> dict:
    """A JSON object this project wrote (a manifest, a results or status file), read and checked, naming the file.

    Args:
        path: the file.
        what: what it is, for messages (``class-image manifest``).
        keys: entries the object must have.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({e}); delete it to start that step again.") from None
    obj = parse_json(text, f"{what} {path}")
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or missing:
        raise ValueError(f"{what} {str(path)!r} is not a JSON object with {', '.join(keys) or 'entries'}: it was "
                         "damaged or written by something else; delete it to start that step again.")
    return obj


_CKPT_FIX = ("delete it and resume from another checkpoint of the run (checkpoints/*.ckpt, --ckpt_path FILE), or "
             "start the run again without --ckpt_path")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A Lightning ``.ckpt`` read with ``torch.load(weights_only=True)``: tensors and plain data only, no code.

    Args:
        path: checkpoint file.
        map_location: where tensors go.
        mmap: map the file instead of reading it (cheap when only a few entries are needed).
    Raises:
        CheckpointError: the file is empty, truncated, not a checkpoint, or holds objects other than plain data;
            the message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    kind = file_kind(path)
    if kind == "empty":
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes; a kill or full disk while it was "
                              f"written by another program?): {_CKPT_FIX}.")
    if kind not in ("torch-zip", "pickle"):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a PyTorch checkpoint (its first bytes are "
                              f"{path.read_bytes()[:8]!r}): {_CKPT_FIX}.")
    import torch  # here, not at the top: the Ray drivers and workers read status files through this package

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and kind == "torch-zip")
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported" in str(e):
            raise CheckpointError(
                f"refusing checkpoint {str(path)!r}: it holds objects other than tensors and plain data, which "
                "could run code when loaded. Checkpoints written by this trainer never do: the file was replaced "
                f"or tampered with. {_CKPT_FIX[0].upper() + _CKPT_FIX[1:]}.") from None
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged ({str(e).splitlines()[0][:120]}): "
                              f"{_CKPT_FIX}.") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}): {_CKPT_FIX}.") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a Lightning "
                              f"checkpoint: {_CKPT_FIX}.")
    return ckpt
