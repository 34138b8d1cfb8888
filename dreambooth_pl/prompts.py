"""Named prompt suites with ``{token} {class}`` placeholders, shipped as package data in ``prompts/*.txt``.

Suites: the DreamBooth paper's 25 object and 25 live-subject evaluation prompts (Ruiz et al. 2023, DreamBench),
and the prompt families of the original project (rajlm10/dreambooth_lora_merging): recontextualisation, art
rendition, property modification, novel view, accessorization.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PLACEHOLDERS = ("{token}", "{class}")


class PromptError(ValueError):
    """A suite name, prompt file or placeholder is wrong; the message says which and how to fix it."""


def _suite_files() -> dict[str, Path]:
    folder = resources.files("dreambooth_pl") / "prompts"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".txt")}


def list_suites() -> list[str]:
    """Names of the built-in prompt suites, sorted."""
    return sorted(_suite_files())


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file: one per line; blank lines and ``#`` comments are skipped.

    Args:
        path: UTF-8 text file.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist: give a text file with one prompt per line.")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise PromptError(f"prompt file {str(path)!r} holds no prompts (one per line; '#' starts a comment).")
    return prompts


def fill(template: str, token: str, class_name: str) -> str:
    """Replace ``{token}`` and ``{class}``; other braces are left alone (no ``str.format``)."""
    return template.replace("{token}", token).replace("{class}", class_name)


def get_suite(name: str, token: str = "sks", class_name: str = "dog") -> list[str]:
    """The prompts of suite ``name`` with the placeholders filled in.

    Args:
        name: a name from :func:`list_suites`.
        token: the rare identifier of the subject (e.g. ``sks``).
        class_name: the class noun (e.g. ``dog``).
    """
    files = _suite_files()
    if name not in files:
        raise PromptError(f"unknown prompt suite {name!r}; choose one of: {', '.join(sorted(files))}")
    return [fill(t, token, class_name) for t in read_prompt_file(files[name])]
