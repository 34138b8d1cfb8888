"""Command-line lists as users type them: ``--generated A B`` reaches the function as the list ``[A, B]``, the
other spellings (``'[A, B]'``, ``--generated+ A``) keep working, and single-value options are untouched."""
from __future__ import annotations

import json
from typing import Optional, Union

import pytest
from jsonargparse import CLI

from dreambooth_pl.argv import gather_lists


def verb(generated: list[str], real: str = "r", lora: Union[str, list[str], None] = None,
         lora_scale: Union[float, list[float], None] = None, gpus: Optional[list[int]] = None,
         loras: Optional[list[str]] = None) -> dict:
    """A verb shaped like evaluate/sample/ablate.

    Args:
        generated: folders.
        real: a folder.
        lora: one file or several.
        lora_scale: one scale or several.
        gpus: GPU ids.
        loras: leading values.
    """
    return dict(generated=generated, real=real, lora=lora, lora_scale=lora_scale, gpus=gpus, loras=loras)


@pytest.mark.parametrize("argv, expected", [
    (["--generated", "A", "B", "--real", "R"], dict(generated=["A", "B"], real="R")),
    (["--generated", "A"], dict(generated=["A"])),
    (["--generated", "[A, B]"], dict(generated=["A", "B"])),
    (["--generated+", "A", "--generated+", "B"], dict(generated=["A", "B"])),
    (["--generated", "1.0", "--lora", "x.safetensors"], dict(generated=["1.0"], lora="x.safetensors")),
    (["--generated", "A", "--lora", "x", "y", "--lora_scale", "1.0", "0.5"],
     dict(lora=["x", "y"], lora_scale=[1.0, 0.5])),
    (["--generated", "A", "--lora_scale", "0.8", "--gpus", "0", "1"], dict(lora_scale=0.8, gpus=[0, 1])),
])
def test_space_separated_lists_reach_the_function_as_lists(argv, expected):
    got = CLI(verb, args=gather_lists(verb, argv), as_positional=False)
    assert {k: got[k] for k in expected} == expected


def test_leading_values_fill_the_named_list_and_options_follow():
    argv = gather_lists(verb, ["a.safetensors:1.0", "b.safetensors:0.8", "--generated", "G", "H"], leading="loras")
    assert argv[:2] == ["--loras", json.dumps(["a.safetensors:1.0", "b.safetensors:0.8"])]
    assert CLI(verb, args=argv, as_positional=False)["generated"] == ["G", "H"]


def test_evaluate_takes_generated_folders_as_typed(tmp_path):
    """The reported case: ``evaluate --generated A B --real R`` was refused with "Expected a <class 'list'>"."""
    from conftest import write_images
    from dreambooth_pl.__main__ import main

    for name, seed in (("A", 1), ("B", 2), ("R", 3)):
        write_images(tmp_path / name, 2, seed=seed)
    (tmp_path / "prompts.txt").write_text("a sks dog\n")
    main(["evaluate", "--generated", str(tmp_path / "A"), str(tmp_path / "B"), "--real", str(tmp_path / "R"),
          "--out", str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.txt"), "--token", "sks",
          "--clip_weights", "null", "--dino_weights", "null", "--device", "cpu"])
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {str(tmp_path / "A"), str(tmp_path / "B")} <= set(rows)
