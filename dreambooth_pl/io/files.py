"""Atomic outputs: a reader, a kill or a full disk sees the old file (or folder) or the whole new one, never half.

Files are written to a temp sibling, fsynced and renamed; folders are built in a temp sibling folder and renamed
into place. Modes follow the umask (``mkstemp`` alone would leave 0600). Temp names carry the writer's pid, so the
next start removes those of dead writers (:func:`clean_stale_temps`) and never another live process's.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

TEMP_SUFFIX = ".dbpl-tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")
OWNER_FILE = ".dreambooth_pl.json"  # in every folder this project builds: what it is, so it may be replaced


class WriteError(OSError):
    """An output could not be written; the file or folder that was there before is unchanged."""


class OutputError(OSError):
    """An output folder cannot be used (unwritable, or not ours to replace); the message names it and the fix."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


class _Sink:
    """A binary file that remembers the OS error of a failed write (torch.save re-raises it as RuntimeError)."""

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


def _fsync_dir(folder: Path) -> None:
    try:  # persist the rename itself; not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_error(path: Path, cause: OSError, hint: str, kind: str = "file") -> WriteError:
    full = cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    fix = "the disk (or quota, or file-size limit) is full: free space" if full else "fix the cause"
    if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "the folder is read-only or not yours: choose a writable output"
    state = f"the previous {path.name} is intact" if path.exists() else f"no {kind} {path.name} was written"
    return WriteError(cause.errno, f"could not write {path}: {cause.strerror or cause} — {state}; {fix}"
                                   + (f" and {hint}" if hint else "") + ".")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], hint: str = "",
                 durable: bool = True) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, give it the umask's mode, rename it over ``path``.

    Args:
        path: destination file; its folder is created if missing.
        write: fills the open binary file.
        hint: what to do after fixing a failed write (e.g. ``resume with --ckpt_path last``).
        durable: fsync the file and its folder; false for a cache's entries, which a reader checks and rebuilds
            (the rename alone keeps a reader from ever seeing half a file).
    Raises:
        WriteError: writing failed (full disk, read-only folder); the temp file is gone, ``path`` untouched.
    """
    path = Path(path)
    sink, tmp = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            write(sink)
            f.flush()
            if durable:
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else getattr(sink, "error", None)
        if cause is None or isinstance(e, WriteError):
            raise
        raise _write_error(path, cause, hint) from e
    if durable:
        _fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``durable``: see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values as their ``str``), atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was built by this project (it holds :data:`OWNER_FILE`)."""
    return (Path(folder) / OWNER_FILE).is_file()


def owner_info(folder: str | os.PathLike) -> Optional[dict]:
    """What :data:`OWNER_FILE` of ``folder`` records (``{"kind": "random-base", ...}``), or None."""
    try:
        info = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove this project's temp files and folders in ``folder`` whose writer is no longer running.

    Returns the removed paths. Files of other programs, and temps of live writers, are left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def check_writable(dirs: dict[str, Optional[str | os.PathLike]]) -> None:
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


def ensure_writable(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``folder`` if needed and prove it writable, before any model loads.

    Args:
        folder: the output folder.
        option: the option that names it, for the message.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"output dir {str(path)!r} is not writable ({e.strerror or e}): choose another {option} "
                          "or fix its permissions.") from None
    return path
