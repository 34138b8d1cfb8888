"""Command-line lists as users type them: ``--generated A B`` and leading ``merge A B --out C`` become one value.

jsonargparse takes a list option as one JSON/YAML value (``--generated '[A, B]'``) or repeated appends
(``--generated+ A``); ``--generated A B`` is refused with "Expected a <class 'list'>". These helpers rewrite the
argument vector before parsing, from the typed signature, so both spellings work and nothing else changes.
"""
from __future__ import annotations

import inspect
import json
import typing
from pathlib import PurePath
from typing import Any, Callable


def _list_element(annotation: Any) -> tuple[bool, bool, Any]:
    """``(is a list option, a single value is also accepted, element type)`` of a parameter's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, tuple) or annotation in (list, tuple):
        return True, False, (typing.get_args(annotation) or (str,))[0]
    lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
    if lists:
        return True, len(args) > len(lists), (typing.get_args(lists[0]) or (str,))[0]
    return False, False, None


def _value(token: str, element: Any) -> Any:
    """One typed element: strings and paths stay text (``1.0`` may be a folder name); numbers are parsed."""
    if element in (str, Any) or (isinstance(element, type) and issubclass(element, PurePath)):
        return token
    import yaml

    try:
        return yaml.safe_load(token)
    except yaml.YAMLError:
        return token  # the parser names the bad value and its expected type


def list_options(func: Callable) -> dict[str, tuple[bool, Any]]:
    """``{option name: (single value accepted, element type)}`` for every list-typed parameter of ``func``."""
    hints = typing.get_type_hints(func)
    out = {}
    for name in inspect.signature(func).parameters:
        is_list, single_ok, element = _list_element(hints.get(name))
        if is_list:
            out[name] = (single_ok, element)
    return out


def gather_lists(func: Callable, args: list[str], leading: str | None = None) -> list[str]:
    """Rewrite ``--name v1 v2 ...`` (and, with ``leading``, the values before the first option) into
    ``--name '[v1, v2, ...]'`` for ``func``'s list parameters.

    Args:
        func: the verb's typed function (its annotations say which options are lists).
        args: the arguments after the verb.
        leading: the list parameter that values before the first option fill (``merge A B --out C``).
    """
    lists = list_options(func)
    out: list[str] = []
    i = 0
    if leading:
        n = next((k for k, a in enumerate(args) if a.startswith("-")), len(args))
        if n:
            out += [f"--{leading}", json.dumps([_value(a, lists.get(leading, (False, str))[1]) for a in args[:n]])]
        i = n
    while i < len(args):
        arg = args[i]
        name = arg[2:].replace("-", "_") if arg.startswith("--") and "=" not in arg else None
        if name not in lists:
            out.append(arg)
            i += 1
            continue
        j = i + 1
        while j < len(args) and not args[j].startswith("--"):
            j += 1
        values = args[i + 1:j]
        single_ok, element = lists[name]
        if len(values) == 1 and (values[0].lstrip().startswith("[") or single_ok):
            out += [arg, values[0]]  # already a list value, or one value where one is accepted
        elif values:
            out += [arg, json.dumps([_value(v, element) for v in values])]
        else:
            out.append(arg)  # no value: the parser's own message
        i = j
    return out
