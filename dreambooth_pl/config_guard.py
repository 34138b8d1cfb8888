"""Configs are code: jsonargparse imports whatever a value names where a parameter takes a class (``class_path``,
``--trainer.logger X``) or a callable (``batch_size_fn: sys.exit``), from YAML and the command line alike. Every
such import passes jsonargparse's ``check_import_path``; :func:`install` puts this module's allowlist there, so it
holds for every parameter, nested ones included, before the named module is imported:

- callables (functions, methods, objects): only this project's own (``dreambooth_pl.*``);
- classes: this project's, and those Lightning and ``torch.optim`` have already loaded (callbacks, loggers,
  strategies, plugins, profilers, optimizers), except ``LambdaCallback``, which calls whatever function it is given.

``DREAMBOOTH_PL_TRUST_CONFIG=1`` lifts the allowlist for a config you trust as you would a script; any other
non-empty value is an error, so that ``false`` or ``no`` never means "trusted".
"""
from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Optional

TRUST_ENV = "DREAMBOOTH_PL_TRUST_CONFIG"
OWN_PREFIX = "dreambooth_pl."
CLASS_PREFIXES = ("lightning.pytorch.", "lightning.fabric.", "pytorch_lightning.", "lightning_fabric.",
                  "torch.optim.")
REFUSED_NAMES = ("LambdaCallback",)


class Guard:
    """One guarded parse: what it was given (to name the key of a refused value) and what was refused."""

    def __init__(self, argv: Optional[list[str]], args_dict: Optional[dict]):
        self.argv, self.args_dict, self.refused = argv, args_dict, []

    def check(self) -> None:
        """Raise :class:`UntrustedConfigError` if anything was refused (jsonargparse may have swallowed it and
        accepted the value as another type, e.g. a string)."""
        if self.refused:
            raise refusal_error(self.refused, self.argv, self.args_dict)


_current: ContextVar[Optional[Guard]] = ContextVar("dreambooth_pl_config_guard", default=None)


class UntrustedConfigError(ValueError):
    """A config names a class or callable outside the allowlist; the message names the key, the value and the
    switch."""


def trusted() -> bool:
    """Whether :data:`TRUST_ENV` is exactly ``1``.

    Raises:
        UntrustedConfigError: it holds any other non-empty value.
    """
    value = os.environ.get(TRUST_ENV, "")
    if value not in ("", "1"):
        raise UntrustedConfigError(f"{TRUST_ENV}={value!r} is not understood: set it to exactly 1 to run a config "
                                   "you trust as you would a script, or unset it (the allowlist then applies).")
    return value == "1"


def _loaded(path: str) -> tuple[bool, Any]:
    """(found, object) for a dotted path, looked up in modules already imported: nothing new is imported."""
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:n]))
        if module is None:
            continue
        obj = module
        for name in parts[n:]:
            if not hasattr(obj, name):
                return False, None
            obj = getattr(obj, name)
        return True, obj
    return False, None


def why_refused(path: str) -> Optional[str]:
    """Why the allowlist refuses the import path ``path`` (None: it may be imported).

    Args:
        path: a dotted path a config value names (``lightning.pytorch.loggers.CSVLogger``, ``sys.exit``).
    """
    short = path.rsplit(".", 1)[-1]
    if short in REFUSED_NAMES:
        return "it calls whatever function the config names (a config could run shell commands through it)"
    if path.startswith(OWN_PREFIX):
        return None  # the project's own classes and functions
    if not path.startswith(CLASS_PREFIXES):
        return "it is outside dreambooth_pl, Lightning and torch.optim"
    found, obj = _loaded(path)
    if not found:
        return "it is not a class that Lightning or torch.optim has loaded"
    if not inspect.isclass(obj):
        return "only this project's own functions may be named as callables"
    defined = f"{obj.__module__}."
    if not defined.startswith((OWN_PREFIX, *CLASS_PREFIXES)):
        return f"it is {obj.__module__}.{obj.__qualname__}, re-exported from outside Lightning"
    return None


def _check_import_path(path: str) -> None:
    """Stands in for jsonargparse's ``check_import_path``: called with every import path a value names, before
    its module is imported (and again with the object's defining path after)."""
    if trusted():
        return _ORIGINAL[0](path)
    why = why_refused(path)
    if why:
        from jsonargparse._common import ImportDenied

        guard = _current.get()
        if guard is not None:
            guard.refused.append((path, why))
        raise ImportDenied(f"{path} is refused: {why}; set {TRUST_ENV}=1 only if you trust this config as you "
                           "would a script")


_ORIGINAL: list = []


def install() -> None:
    """Put :func:`_check_import_path` where jsonargparse's ``import_object`` checks each path (idempotent).

    Raises:
        UntrustedConfigError: :data:`TRUST_ENV` holds a value other than ``1``.
        RuntimeError: this jsonargparse imports values without that check (a version the guard does not know).
    """
    from jsonargparse import _util

    trusted()  # a bad switch value is an error before anything is parsed
    if _ORIGINAL:
        return
    if "check_import_path" not in _util.import_object.__code__.co_names:
        raise RuntimeError("this jsonargparse resolves import paths without check_import_path, so config values "
                           "could import any module; install the version constraints.txt pins.")
    _ORIGINAL.append(_util.check_import_path)
    _util.check_import_path = _check_import_path


def current() -> Optional[Guard]:
    """The guarded parse running now, if any."""
    return _current.get()


@contextmanager
def guarded(argv: Optional[list[str]] = None, args_dict: Optional[dict] = None) -> Iterator[Guard]:
    """Record, while the block parses and builds a config, every value the allowlist refuses (the allowlist
    itself applies to every parse once :func:`install` ran).

    Args:
        argv: the command line after the verb, to name the key of a refused value.
        args_dict: or the config given as a dict.
    """
    install()
    token = _current.set(Guard(argv, args_dict))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def _leaves(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, node


def refusal_error(refused: list, argv: Optional[list[str]], args_dict: Optional[dict] = None
                  ) -> UntrustedConfigError:
    """One message naming each refused value with the key (and file) that gave it, and the switch.

    Args:
        refused: ``[(path, why), ...]`` from :func:`guarded`.
        argv: the command line after the verb (its ``--config`` files are searched too), or None.
        args_dict: the config given as a dict instead of a command line.
    """
    where = list(sources(argv or []))
    if args_dict is not None:
        where.append(("the given config", args_dict))
    lines, seen = [], set()
    for path, why in refused:
        if path in seen:
            continue
        seen.add(path)
        keys = [f"{src}: {key}" if src != f"--{key}" else src
                for src, tree in where for key, v in _leaves(tree, "") if isinstance(v, str) and v.strip() == path]
        lines.append(f"  {keys[0] if keys else 'a value'} = {path}: {why}")
    return UntrustedConfigError(
        "refused, nothing imported: configs are code (a value naming a class or function makes the parser import "
        "and run it), and these are not on the allowlist (docs/reliability.md):\n" + "\n".join(lines)
        + f"\nName a dreambooth_pl or Lightning class instead, or set {TRUST_ENV}=1 if you trust this config as "
        "you would a script.")


def sources(argv: list[str]) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) of each ``--config`` (or ``-c``) file and each inline ``--key value`` of the command
    line (a bare ``--key`` gives ``{key: None}``)."""
    import yaml

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("-c") and not arg.startswith("--"):  # -c FILE, -c=FILE and argparse's -cFILE
            arg = "--config" + ("=" + arg[2:].removeprefix("=") if len(arg) > 2 else "")
        key, eq, value = arg.partition("=")
        if not arg.startswith("--"):
            continue
        if not eq:  # a bare flag takes the next word as its value only if that word is not an option itself
            value = ""
            if i < len(argv) and not argv[i].startswith("-"):
                value = argv[i]
                i += 1
        key = key[2:]
        if key == "config" and value:
            try:
                text = Path(value).read_text(encoding="utf-8")
            except OSError:
                continue  # the parser reports a missing file itself
            try:
                yield value, yaml.safe_load(text)
            except yaml.YAMLError:
                continue  # and a broken one
        elif key != "config":
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            yield f"--{key}", {key: parsed}
