"""Atomic outputs: a reader (or a crash) sees the old file or folder or the whole new one, never half of one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp name beside ``path``, then rename it over ``path``.

    Args:
        path: destination file; its folder is created if missing.
        write: writes the whole file at the path it is given (pass an explicit format to savers that guess it
            from the suffix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_pipeline_atomically(pipe, dest: str | os.PathLike) -> str:
    """``pipe.save_pretrained`` into a temp folder beside ``dest``, then swap it in (safetensors weights)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "pipe", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
