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


# a writer killed (SIGKILL) between writing its temp file and renaming it: os.fsync of a temp kills the process
_KILLED_WRITER = """
import os, signal, sys
real = os.fsync
def fsync(fd):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(".dbpl-tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fsync = fsync
from dreambooth_pl.__main__ import main
main(sys.argv[1:])
"""


def _kill_then_rerun(args: list[str], folder: Path) -> None:
    import subprocess
    import sys

    from dreambooth_pl.__main__ import main

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(folder.glob(".*.dbpl-tmp")), "the killed writer left no temp file: the test tests nothing"
    main(args)
    assert not list(folder.glob("*.dbpl-tmp")) and not list(folder.glob(".*.dbpl-tmp"))


@pytest.mark.slow
def test_no_temp_file_survives_a_kill_then_rerun_of_generate_class_images(tiny_base, tmp_path):
    out = tmp_path / "class"
    _kill_then_rerun(["generate-class-images", "--base", tiny_base, "--prompt", "a dog", "--out", str(out),
                      "--num", "2", "--sampler.steps", "1", "--resolution", "64", "--device", "cpu",
                      "--dtype", "float32", "--progress", "false"], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["class_00000.png", "class_00001.png"]


@pytest.mark.slow
def test_no_temp_file_survives_a_kill_then_rerun_of_export(tmp_path):
    import torch
    from test_files import _one_module_file

    source = _one_module_file(tmp_path / "in.safetensors", torch.ones(2, 64), torch.ones(64, 2))
    out = tmp_path / "exported"
    out.mkdir()
    _kill_then_rerun(["export", "--source", str(source), "--out", str(out / "lora.safetensors")], out)
    assert (out / "lora.safetensors").stat().st_size > 0
