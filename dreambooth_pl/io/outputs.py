"""Output folders: one rule for every verb that writes, checked before any work.

- ``/``, the home folder and any folder holding the current folder or an input are refused, always;
- the current folder is accepted only while it holds nothing but earlier output of the same verb;
- any other existing folder that holds something else is refused unless ``--overwrite``;
- temp files a killed writer left there are removed (:func:`~dreambooth_pl.io.files.clean_stale_temps`).

A folder holds earlier output of a verb when its :data:`OWNER_FILE` names that verb, or when every entry matches
the verb's file patterns. :func:`atomic_dir` (folders replaced whole: ``merge --method fuse``, ``make-base``)
keeps the same rule, with the current folder refused even when empty.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from .files import (_TEMP_NAME, OWNER_FILE, TEMP_SUFFIX, OutputError, WriteError, _fsync_dir, _temp_prefix, _umask,
                    _write_error, clean_stale_temps, is_ours, owner_info, write_json)


def _protected(dest: Path, inputs: Iterable[str | os.PathLike], cwd_ok: bool = False) -> Optional[str]:
    """Why ``dest`` may never be written into or replaced, even with overwrite (None: it may be).

    Args:
        dest: the output folder.
        inputs: files and folders the command reads.
        cwd_ok: the current folder itself may hold output (its content is judged by the caller).
    """
    real = Path(os.path.realpath(dest))
    home = Path(os.path.realpath(Path.home()))
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "it is the root folder"
    if real == home or real in home.parents:
        return "it is (or holds) your home folder"
    if real in cwd.parents or (real == cwd and not cwd_ok):
        return "it is (or holds) the current folder"
    for p in inputs:
        rp = Path(os.path.realpath(p))
        if rp == real or real in rp.parents:
            return f"it holds the input {str(p)!r}"
    return None


def _foreign(folder: Path, verb: str, ours: Sequence[str]) -> list[str]:
    """Entries of ``folder`` that are not earlier output of ``verb`` (all of them when no pattern matches)."""
    if (owner_info(folder) or {}).get("verb") == verb:
        return []
    return sorted(e.name for e in folder.iterdir()
                  if not (e.name == OWNER_FILE or _TEMP_NAME.match(e.name) or e.name.startswith(".write-test-")
                          or any(fnmatch.fnmatch(e.name, g) for g in ours)))


def check_output_dir(folder: str | os.PathLike, verb: str, option: str = "--out", overwrite: Optional[bool] = None,
                     inputs: Iterable[str | os.PathLike] = (), ours: Sequence[str] = (), create: bool = True) -> Path:
    """Apply the output rule to ``folder`` before any work; then remove dead writers' temps, create the folder,
    prove it writable and mark it as ``verb``'s output.

    Args:
        folder: the folder the verb writes its files into.
        verb: the verb (``sample``); a folder marked with it, or holding only ``ours``, is its earlier output.
        option: the option that names ``folder``, for messages.
        overwrite: write into an existing folder that holds other files (same-named files are replaced); None:
            the verb has no ``--overwrite``.
        inputs: what the command reads; a folder holding one is refused.
        ours: glob patterns of the files ``verb`` writes (``*.png``, ``manifest.json``).
        create: create, probe and mark the folder (False: only check; the caller's library creates it).
    Raises:
        OutputError: naming the folder, why, and the fix.
    """
    path = Path(folder).expanduser()
    why = _protected(path, inputs, cwd_ok=True)
    if why:
        raise OutputError(f"refusing to write into {option} {str(path)!r}: {why}. Choose a new folder, e.g. "
                          f"outputs/{verb}.")
    fresh = True
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{option} {str(path)!r} exists and is not a folder: choose a new folder name.")
        foreign = _foreign(path, verb, ours)
        fresh = not foreign
        if foreign and Path(os.path.realpath(path)) == Path.cwd().resolve():
            raise OutputError(f"refusing to write into {option} {str(path)!r}: it is the current folder and holds "
                              f"{foreign[0]!r}, which is not output of {verb}. Choose a new folder, e.g. "
                              f"outputs/{verb}.")
        if foreign and not overwrite:
            fix = (", or pass --overwrite to write into it (files of the same name are then replaced)"
                   if overwrite is not None else "")
            raise OutputError(f"{option} {str(path)!r} already holds files that are not output of {verb} (e.g. "
                              f"{foreign[0]!r}): choose a new folder{fix}.")
        clean_stale_temps(path)
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
        here = Path(os.path.realpath(path)) == Path.cwd().resolve()  # the current folder is never claimed
        if fresh and not here and not (path / OWNER_FILE).exists():
            write_json(path / OWNER_FILE, {"made_by": "dreambooth_pl", "verb": verb})
    except OSError as e:
        raise OutputError(f"output dir {str(path)!r} is not writable ({e.strerror or e}): choose another "
                          f"{option} or fix its permissions.") from None
    return path


def check_output_file(path: str | os.PathLike, option: str = "--out", inputs: Iterable[str | os.PathLike] = ()
                      ) -> Path:
    """Refuse, before any work, a file output that would land in ``/``, be a folder, or replace an input; remove
    dead writers' temps beside it.

    Args:
        path: the file the verb writes.
        option: the option that names it.
        inputs: files the command reads.
    Raises:
        OutputError: naming the path, why, and the fix.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        why = _protected(path, ()) or "it is a folder"
        raise OutputError(f"refusing to write {option} {str(path)!r}: {why}. Give a file name, e.g. "
                          f"{path.name or 'out'}.safetensors in a folder of your own.")
    real = Path(os.path.realpath(path))
    if real.parent == Path(real.anchor):
        raise OutputError(f"refusing to write {option} {str(path)!r}: it would land in the root folder. Give a "
                          "path in a folder of your own.")
    for p in inputs:
        if Path(os.path.realpath(p)) == real:
            raise OutputError(f"refusing to write {option} {str(path)!r}: it is the input {str(p)!r}, which would "
                              "be replaced. Give another file name.")
    clean_stale_temps(path.parent)
    return path


def check_replaceable(dest: str | os.PathLike, overwrite: bool, option: str = "--out",
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, an output folder that may not be replaced whole.

    Args:
        dest: the folder that will be written.
        overwrite: the user allowed replacing an existing folder.
        option: the option that names ``dest`` (for the message).
        inputs: files and folders this command reads; a folder holding one is never replaced.
    Raises:
        OutputError: naming the folder, why, and the fix.
    """
    dest = Path(dest)
    why = _protected(dest, inputs)
    if why:
        raise OutputError(f"refusing to replace {option} {str(dest)!r}: {why}. Choose a new folder name.")
    if not dest.exists() and not dest.is_symlink():
        return
    if not dest.is_dir():
        raise OutputError(f"{option} {str(dest)!r} exists and is not a folder: choose a new folder name.")
    if not any(dest.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        what = "was built by dreambooth_pl" if is_ours(dest) else "was not created by dreambooth_pl"
        raise OutputError(f"{option} {str(dest)!r} already exists and {what}: choose a new folder name, or pass "
                          "--overwrite to replace it (its current contents are then deleted).")
@contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False, option: str = "--out",
               inputs: Iterable[str | os.PathLike] = (), owner: Optional[dict] = None) -> Iterator[Path]:
    """Yield a new temp folder beside ``dest``; on success it is marked ours and renamed to ``dest``.

    Args:
        dest: the final folder.
        overwrite: replace an existing non-empty ``dest`` (never ``.``, ``/``, home or a folder holding inputs).
        option: the option that names ``dest``, for messages.
        inputs: what the command reads (see :func:`check_replaceable`).
        owner: what to record in :data:`OWNER_FILE` (e.g. ``{"kind": "random-base", "preset": "tiny"}``).
    """
    dest = Path(dest)
    inputs = list(inputs)
    check_replaceable(dest, overwrite, option, inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_temp_prefix(dest), suffix=TEMP_SUFFIX))
    except OSError as e:
        raise _write_error(dest, e, f"choose another {option}", "folder") from None
    try:
        yield tmp
        write_json(tmp / OWNER_FILE, dict(owner or {}, made_by="dreambooth_pl"))
        os.chmod(tmp, 0o777 & ~_umask())
        check_replaceable(dest, overwrite, option, inputs)  # it may have appeared while we wrote
        old = None
        if dest.exists():
            if any(dest.iterdir()):
                old = dest.with_name(f"{_temp_prefix(dest)}old{TEMP_SUFFIX}")
                os.replace(dest, old)
            else:
                dest.rmdir()
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if isinstance(e, (WriteError, OutputError)):
            raise
        raise _write_error(dest, e, f"choose another {option}", "folder") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


