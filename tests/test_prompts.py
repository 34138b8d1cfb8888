"""Prompt suites: the DreamBench lists as shipped, the original project's families, placeholders, errors."""
from __future__ import annotations

import pytest

from dreambooth_pl.prompts import PromptError, fill, get_suite, list_suites, read_prompt_file

FAMILIES = ("recontext", "art_rendition", "property", "novel_view", "accessorization")


def test_suites_are_listed_and_hold_the_paper_prompts():
    assert set(FAMILIES) | {"dreambench_object", "dreambench_live"} <= set(list_suites())
    obj, live = get_suite("dreambench_object", "sks", "backpack"), get_suite("dreambench_live", "sks", "dog")
    assert len(obj) == 25 and len(live) == 25
    assert obj[0] == "a sks backpack in the jungle" and obj[-1] == "a cube shaped sks backpack"
    assert "a sks dog in a purple wizard outfit" in live and "a sks dog wearing a red hat" not in obj


@pytest.mark.parametrize("name", FAMILIES)
def test_family_prompts_fill_both_placeholders(name):
    prompts = get_suite(name, "zwx", "person")
    assert len(prompts) >= 4
    assert all("zwx person" in p and "{" not in p for p in prompts)


def test_issue_examples_are_in_their_families():
    assert "a painting of sks dog at Oktoberfest" in get_suite("recontext")
    assert "a painting of sks dog in the style of Van Gogh" in get_suite("art_rendition")
    assert "a side view photo of sks dog" in get_suite("novel_view")
    assert "a photo of sks dog with sunglasses" in get_suite("accessorization")
    assert "a photo of sks dog with blonde hair" in get_suite("property")


def test_unknown_suite_lists_the_valid_names():
    with pytest.raises(PromptError, match="unknown prompt suite 'dreambench'.*dreambench_object"):
        get_suite("dreambench")


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\na {token} {class} in {braces}\n  second  \n", encoding="utf-8")
    assert read_prompt_file(f) == ["a {token} {class} in {braces}", "second"]
    assert fill(read_prompt_file(f)[0], "sks", "cat") == "a sks cat in {braces}"
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
