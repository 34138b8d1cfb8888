"""A YAML file read into a typed dataclass (grid files, subjects files): jsonargparse checks every field's type."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


def load_typed(path: str, cls: type[T], verb: str, kind: str, example: str,
               prepare: Optional[Callable[[dict], Any]] = None) -> T:
    """Parse ``path`` into ``cls``; a missing file or a bad key or type stops with a message naming the file.

    Args:
        path: the YAML file.
        cls: the dataclass it holds.
        verb: the command, first word of every message.
        kind: what the file is ("grid file", "subjects file").
        example: where to find a good one.
        prepare: edits the raw mapping before the type check (e.g. a single value where a list is typed).
    """
    import yaml
    from jsonargparse import ArgumentParser

    if not Path(path).is_file():
        raise SystemExit(f"{verb}: {kind} {path!r} does not exist (see {example}).")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--spec", type=cls, required=True)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if prepare is not None:
            prepare(raw)
        cfg = parser.parse_object({"spec": raw})
        return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg).spec  # renamed in 4.49
    except Exception as e:  # noqa: BLE001 - yaml or type errors: say which file and which key
        raise SystemExit(f"{verb}: invalid {kind} {path!r}: {str(e).strip()[:800]}") from None
