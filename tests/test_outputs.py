"""io/outputs.py: one output-folder rule for every verb (/, home, the current folder, foreign folders), checked
before any work, and the temp files of killed writers removed on the next run."""
import os
from pathlib import Path

import pytest

from dreambooth_pl.io import OWNER_FILE, OutputError, check_output_dir, check_output_file


def test_root_home_and_folders_holding_the_cwd_are_refused_even_with_overwrite(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    for folder, why in (("/", "root folder"), (str(home), "home folder"), (str(tmp_path), "home folder"),
                        ("..", "home folder")):
        with pytest.raises(OutputError, match=why):
            check_output_dir(folder, "sample", overwrite=True)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(OutputError, match="holds\\) the current folder"):
        check_output_dir("..", "sample", overwrite=True)


def test_the_current_folder_only_while_it_holds_that_verbs_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_output_dir(".", "sample", overwrite=False, ours=("*.png",))  # empty: fine, but never claimed
    assert not (tmp_path / OWNER_FILE).exists()
    (tmp_path / "0000_s0.png").write_bytes(b"png")
    check_output_dir(".", "sample", overwrite=False, ours=("*.png",))  # its own earlier output
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="current folder and holds 'notes.txt', which is not output of sample"):
        check_output_dir(".", "sample", overwrite=True, ours=("*.png",))
    with pytest.raises(OutputError, match="current folder"):  # the mark of another verb is not this one's
        check_output_dir(".", "evaluate", ours=("results.*",))


def test_a_foreign_folder_needs_overwrite_and_an_own_one_does_not(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(OutputError, match="holds files that are not output of sample .*'thesis.tex'.*--overwrite"):
        check_output_dir(out, "sample", overwrite=False, ours=("*.png",))
    with pytest.raises(OutputError, match=r"'thesis.tex'\): choose a new folder\.$"):  # a verb without --overwrite
        check_output_dir(out, "evaluate", ours=("results.*",))
    check_output_dir(out, "sample", overwrite=True, ours=("*.png",))
    assert not (out / OWNER_FILE).exists()  # a foreign folder is written into, never claimed
    mine = check_output_dir(tmp_path / "new" / "samples", "sample", overwrite=False)
    (mine / "anything.bin").write_bytes(b"x")  # the mark makes every file in it this verb's output
    check_output_dir(mine, "sample", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "sample")


def test_file_outputs(tmp_path):
    with pytest.raises(OutputError, match="root folder"):
        check_output_file("/")
    with pytest.raises(OutputError, match="land in the root folder"):
        check_output_file("/pytorch_lora_weights.safetensors")
    with pytest.raises(OutputError, match="it is a folder"):
        check_output_file(tmp_path)
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"x")
    with pytest.raises(OutputError, match="it is the input"):
        check_output_file(str(lora), inputs=[str(lora)])
    check_output_file(tmp_path / "b.safetensors")


def test_stale_temps_go_on_the_next_run_of_any_verb(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no live process has it
    out = check_output_dir(tmp_path / "o", "sample")
    stale = [out / f".0000_s0.png.{dead}.abc.dbpl-tmp", tmp_path / f".x.safetensors.{dead}.q.dbpl-tmp"]
    live = out / f".0001_s1.png.{os.getpid()}.abc.dbpl-tmp"
    for p in (*stale, live):
        p.write_bytes(b"half")
    check_output_dir(out, "sample")
    check_output_file(tmp_path / "x.safetensors")
    assert not any(p.exists() for p in stale) and live.exists()


WRITING_VERBS = {
    "sample": ["sample", "--base", "unused", "--prompt", "a dog", "--out", "/"],
    "generate-class-images": ["generate-class-images", "--base", "unused", "--prompt", "a dog", "--out", "/"],
    "export": ["export", "--source", "x.ckpt", "--out", "/"],
    "merge": ["merge", "a.safetensors", "--out", "/"],
    "merge --method fuse": ["merge", "a.safetensors", "--method", "fuse", "--base", "b", "--out", "/"],
    "make-base": ["make-base", "--out", "/"],
    "make-procedural": ["make-procedural", "--out", "/"],
    "evaluate": ["evaluate", "--generated", "[g]", "--real", "r", "--out", "/"],
    "merge-eval": ["merge-eval", "--subject", "s", "--style", "t", "--base", "b", "--instance_dir", "i",
                   "--prompt", "p", "--style_text", "t", "--out", "/"],
}


@pytest.mark.parametrize("verb", list(WRITING_VERBS))
def test_every_verb_refuses_the_root_folder_before_any_work(verb, monkeypatch, tmp_path):
    from dreambooth_pl.__main__ import main

    monkeypatch.chdir(tmp_path)
    # make-base has refused any folder holding files since before this rule, in its own words
    with pytest.raises((OutputError, ValueError) if verb == "make-base" else OutputError, match="root folder|'/'"):
        main(WRITING_VERBS[verb])
    assert not Path("/pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("option", ["export.dirpath", "checkpoint.dirpath"])
def test_fit_refuses_the_root_folder_before_the_model_loads(option, subject_dirs, tmp_path, no_model_load):
    from dreambooth_pl.cli import DreamBoothCLI
    from conftest import fit_args

    with pytest.raises(OutputError, match=f"refusing to write into {option} '/': it is the root folder"):
        DreamBoothCLI(args=fit_args("unused", *subject_dirs, str(tmp_path), **{option: "/"}))
