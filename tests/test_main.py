"""The dispatcher: README's command table names exactly the registered verbs, and each verb resolves to a function."""
from __future__ import annotations

import importlib
import re

from conftest import REPO
from dreambooth_pl.__main__ import COMMANDS, TRAINER_VERBS


def test_readme_verb_table_equals_the_registered_commands():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Commands"):text.index("Examples:")]
    documented = {v for row in table.splitlines() if row.startswith("| `")
                  for v in re.findall(r"`([a-z-]+)`", row.split("|")[1])}
    assert documented == set(COMMANDS) | set(TRAINER_VERBS)


def test_every_verb_resolves_to_a_documented_function():
    for verb, target in COMMANDS.items():
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        assert callable(fn) and (fn.__doc__ or "").strip(), verb
