"""A steady training step reads no device value on the host: on a GPU each such read (``.item()``, ``float()``,
``bool()`` of a tensor) waits for the queued step, so the host cannot prepare the next one (BENCHMARKS.md: a
Lightning progress-bar conversion and a blocking ``torch.tensor(..., device=)`` cost 40-60 ms of idle GPU a step).
On the CPU the reads are free, but their call sites are the same: this test finds them there."""
from __future__ import annotations

import traceback

import lightning as L
import torch

from conftest import fit_args

READS = ("item", "__bool__", "__float__", "__int__", "tolist")


class ReadSpy(L.Callback):
    """Records where a one-element tensor is read on the host during the steps after ``start``."""

    def __init__(self, start: int):
        self.start, self.active, self.sites = start, False, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = batch_idx >= self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= trainer.max_steps:  # the run's end (epoch-end check, export) reads once: allowed
            self.active = False


def test_steady_steps_read_nothing_from_the_device(tiny_base, subject_dirs, tmp_path, monkeypatch):
    from dreambooth_pl.cli import DreamBoothCLI

    spy = ReadSpy(start=2)
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def spying(name):
        def read(self, *args, **kwargs):
            if spy.active and (self.numel() == 1 or name == "tolist"):
                caller = traceback.extract_stack()[-2]  # CPU-only paths (torch's single-tensor Adam) read in torch
                if ("lightning" in caller.filename or "/dreambooth_pl/" in caller.filename) \
                        and "/dreambooth_pl/data/" not in caller.filename:  # the data streams' CPU draws
                    spy.sites.append(f"{name} at {caller.filename.split('site-packages/')[-1]}:{caller.lineno} "
                                     f"({caller.name})")
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, spying(name))
    inst, cls = subject_dirs
    args = fit_args(tiny_base, inst, cls, str(tmp_path), steps=5, **{
        "model.perf.cache": "all", "trainer.log_every_n_steps": 50, "checkpoint.every_n_train_steps": 0,
        "trainer.enable_progress_bar": "true"})
    DreamBoothCLI(args=args, trainer_defaults={"callbacks": [spy]})
    # the fit ran its steady steps, and nothing in them (loss logging, progress bar, fault checks, time ids,
    # callbacks) read a tensor on the host; a read at the run's end (export, summary) is outside the window
    assert spy.start < 5 and spy.sites == [], "\n".join(spy.sites)
