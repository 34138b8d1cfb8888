"""Configs are code: a ``class_path`` makes jsonargparse import and build any class while parsing. Before parsing,
every ``class_path`` in the command line and its ``--config`` files must name a class that this project or
Lightning ships (callbacks, loggers, strategies, plugins, optimizers); ``LambdaCallback`` (which calls whatever
function a config names) is refused. ``DREAMBOOTH_PL_TRUST_CONFIG=1`` allows any class, as running a script would.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

TRUST_ENV = "DREAMBOOTH_PL_TRUST_CONFIG"
ALLOWED_PREFIXES = ("lightning.pytorch.", "lightning.fabric.", "pytorch_lightning.", "lightning_fabric.",
                    "dreambooth_pl.", "torch.optim.")
REFUSED_NAMES = ("LambdaCallback",)
# keys whose plain string value is a class name, e.g. --trainer.logger lightning.pytorch.loggers.CSVLogger
CLASS_KEYS = ("callbacks", "logger", "plugins", "strategy", "class_path", "optimizer", "lr_scheduler")


class UntrustedConfigError(ValueError):
    """A config names a class outside the project and Lightning; the message names it and the switch."""


def _class_paths(node: Any, key: str = "") -> Iterator[str]:
    """Every class name in a parsed config value (``class_path`` entries and dotted strings under class keys)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _class_paths(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _class_paths(v, key)
    elif isinstance(node, str) and key.split(".")[-1].rstrip("+") in CLASS_KEYS and "." in node.strip():
        yield node.strip()


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


def check_class_paths(argv: list[str]) -> None:
    """Refuse, before jsonargparse imports anything, a class the project and Lightning do not ship.

    Args:
        argv: the command line after the verb (``--config`` files are read too).
    Raises:
        UntrustedConfigError: naming the class, where it came from, and :data:`TRUST_ENV`.
    """
    if os.environ.get(TRUST_ENV, "") not in ("", "0"):
        return
    for where, tree in sources(argv):
        for name in _class_paths(tree):
            short = name.rsplit(".", 1)[-1]
            if short in REFUSED_NAMES:
                raise UntrustedConfigError(
                    f"{where}: {name} is refused: it calls whatever function the config names (a config could "
                    f"run shell commands through it). Write a Callback class instead, or set {TRUST_ENV}=1 if you "
                    "trust this config as you would a script.")
            if not name.startswith(ALLOWED_PREFIXES):
                raise UntrustedConfigError(
                    f"{where}: class_path {name!r} is outside dreambooth_pl and Lightning; configs are code (the "
                    f"class is imported and built), so only those are accepted. Set {TRUST_ENV}=1 to allow it if "
                    "you trust this config as you would a script.")
