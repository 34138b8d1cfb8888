"""io: atomic files and folders (a failure keeps the old one), umask modes, our temps cleaned, folders never lost."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import resource
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dreambooth_pl.checkpoint_io import AtomicCheckpointIO
from dreambooth_pl.io import (OWNER_FILE, OutputError, WriteError, atomic_dir, atomic_write, check_writable,
                              clean_stale_temps, write_json, write_text)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Make the kernel refuse writes past ``nbytes`` (EFBIG), as a full disk refuses them (ENOSPC)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"step": 1, "w": torch.ones(8)}, f))
    before = path.read_bytes()
    with file_size_limit(64 * 1024), pytest.raises(WriteError) as err:
        atomic_write(path, lambda f: torch.save({"step": 2, "w": torch.ones(200_000)}, f))
    assert "the previous last.ckpt is intact" in str(err.value) and "full" in str(err.value)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["step"] == 1


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_checkpoints_go_through_the_plugin(tmp_path):
    """A Lightning run whose next checkpoint write fails keeps last.ckpt of the step before, loadable."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=2, plugins=[AtomicCheckpointIO()], callbacks=[ckpt], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = _Tiny()
    trainer.fit(module)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    module.layer = torch.nn.Linear(4, 4000)  # the next checkpoint is larger than the limit below
    with file_size_limit(len(before) + 1024), pytest.raises(WriteError):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2


def test_unwritable_output_dirs_listed(tmp_path):
    (tmp_path / "afile").write_text("x")
    check_writable({"ok": tmp_path / "new" / "deeper"})  # missing folders are fine: they will be created
    with pytest.raises(SystemExit) as err:
        check_writable({"checkpoint.dirpath": tmp_path / "afile" / "ckpts", "export.dirpath": "/proc/no/such"})
    msg = str(err.value)
    assert "checkpoint.dirpath = " in msg and "is a file" in msg and "export.dirpath = /proc/no/such" in msg


def test_an_interrupted_write_leaves_the_old_file_or_nothing(tmp_path):
    def dies_halfway(f):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.png", dies_halfway)
    (tmp_path / "old.png").write_bytes(b"complete")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "old.png", dies_halfway)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"complete"


def test_files_and_folders_take_their_mode_from_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as tmp:
            write_text(tmp / "b.txt", "b")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "b.txt").stat().st_mode & 0o777 == 0o644


def test_full_disk_on_a_json_names_the_file(tmp_path):
    write_json(tmp_path / "config.json", {"ok": 1})
    with file_size_limit(1024), pytest.raises(WriteError) as err:
        write_json(tmp_path / "config.json", {"big": "x" * 10_000})
    assert str(tmp_path / "config.json") in str(err.value) and "full" in str(err.value)
    assert (tmp_path / "config.json").read_text().strip() == '{\n  "ok": 1\n}'


def _user_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "thesis.txt").write_text("years of work")
    return root


def test_atomic_dir_never_replaces_a_folder_that_is_not_ours(tmp_path):
    user = _user_folder(tmp_path / "v")
    with pytest.raises(OutputError, match=r"already exists and was not created by dreambooth_pl.*--overwrite"):
        with atomic_dir(user):
            pass
    assert (user / "thesis.txt").read_text() == "years of work"
    with atomic_dir(tmp_path / "ours", owner={"kind": "test"}) as tmp:
        write_text(tmp / "x", "1")
    assert (tmp_path / "ours" / OWNER_FILE).is_file()
    with atomic_dir(tmp_path / "ours", overwrite=True) as tmp:  # replaced whole, or not at all
        write_text(tmp / "y", "2")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [OWNER_FILE, "y"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left beside it


def test_atomic_dir_refuses_cwd_home_root_and_input_folders_even_with_overwrite(tmp_path, monkeypatch):
    user = _user_folder(tmp_path / "work")
    monkeypatch.chdir(user)
    for dest, why in ((".", "current folder"), ("/", "root folder"), (os.path.expanduser("~"), "home folder"),
                      (str(tmp_path), "current folder")):
        with pytest.raises(OutputError, match=why):
            with atomic_dir(dest, overwrite=True):
                raise AssertionError("must refuse before yielding")
    other = _user_folder(tmp_path / "other")
    with pytest.raises(OutputError, match=r"holds the input"):
        with atomic_dir(other, overwrite=True, inputs=[other / "thesis.txt"]):
            pass
    assert (user / "thesis.txt").is_file() and (other / "thesis.txt").is_file()


def test_stale_temps_of_dead_writers_are_removed_and_others_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".last.ckpt.{pid}.abc123.dbpl-tmp").write_bytes(b"")
    (tmp_path / f".out.{pid}.xyz.dbpl-tmp").mkdir()
    (tmp_path / f".last.ckpt.{os.getpid()}.live.dbpl-tmp").write_bytes(b"")  # a live writer's
    (tmp_path / ".someone-else.tmp").write_bytes(b"")  # not ours
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".last.ckpt.{pid}.abc123.dbpl-tmp", f".out.{pid}.xyz.dbpl-tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".last.ckpt.{os.getpid()}.live.dbpl-tmp",
                                                                 ".someone-else.tmp"])
