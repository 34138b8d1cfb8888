"""Atomic checkpoint writes: a crash, kill or full disk mid-write leaves the previous checkpoint intact.

Lightning's own ``_atomic_save`` stages local files in the system temp dir and moves them over, which becomes a
copy (not a rename) across filesystems and is not fsynced; this writes beside the target and renames.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file that was there before is unchanged."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path`` (POSIX-atomic).

    Args:
        path: destination file; its folder is created if missing.
        write: fills the open binary file.
    Raises:
        CheckpointWriteError: when writing fails (e.g. ``ENOSPC``); the temp file is removed, ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    sink = None
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failed write as RuntimeError: the sink kept the OS error behind it
        cause = e if isinstance(e, OSError) else getattr(sink, "error", None)
        if cause is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        hint = "the disk (or quota, or file-size limit) is full: free space" if full else "fix the cause"
        state = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointWriteError(cause.errno, f"could not write {path}: {cause.strerror or cause} — {state}; "
                                   f"{hint} and resume with --ckpt_path last") from e
    try:  # persist the rename itself; not every filesystem lets a folder be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Sink:
    """A binary file that remembers the OS error of a failed write (callers may re-raise it as another type)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes local checkpoints with :func:`atomic_write` (remote URLs: Lightning's).

    Loading is Lightning's ``torch.load``; the CLI passes ``weights_only=True`` (see ``cli.py``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_writable(dirs: dict[str, str | os.PathLike]) -> None:
    """Fail before any work when an output folder cannot be written, naming the option to change.

    Args:
        dirs: option name (e.g. ``trainer.logger.init_args.save_dir``) -> folder that will be written.
    Raises:
        SystemExit: one message listing every unwritable folder and why.
    """
    problems = []
    for key, folder in dirs.items():
        if folder is None or "://" in str(folder):
            continue
        probe = Path(folder).expanduser().absolute()
        while not probe.exists() and probe != probe.parent:  # it will be created below its nearest existing parent
            probe = probe.parent
        try:
            if not probe.is_dir():
                raise NotADirectoryError(f"{probe} is a file")
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-test-")  # a real write: root ignores permissions
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            problems.append(f"  {key} = {folder}: {e.strerror or e} ({probe})")
    if problems:
        raise SystemExit("output folder(s) cannot be written — choose writable ones before training starts:\n"
                         + "\n".join(problems))
