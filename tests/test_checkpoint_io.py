"""Atomic checkpoint writes: a real write failure (file-size limit = disk full) leaves the previous file intact."""
from __future__ import annotations

import contextlib
import resource
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dreambooth_pl.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, atomic_write, check_writable


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
    with file_size_limit(64 * 1024), pytest.raises(CheckpointWriteError) as err:
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
    with file_size_limit(len(before) + 1024), pytest.raises(CheckpointWriteError):
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
