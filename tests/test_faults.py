"""Runs survive faults: an injected NaN never reaches a checkpoint; SIGTERM/SIGINT save a resumable checkpoint."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_args
from safetensors.torch import load_file

from dreambooth_pl.callbacks.fault_tolerance import FaultTolerance, NonFiniteLossError, StoppedBySignal
from dreambooth_pl.cli import DreamBoothCLI


class NaNPixels(L.Callback):
    """Fault injection: the instance images of the given (1-based) steps become NaN, as a broken VAE input would."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 in self.steps:
            batch["pixel_values"][~batch["is_prior"]] = math.nan


class SendSignal(L.Callback):
    """Fault injection: this process receives ``signum`` during step ``step`` (as from ``kill`` or Ctrl-C)."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def _fit(tiny_base, subject_dirs, root, steps, inject, **over):
    args = fit_args(tiny_base, *subject_dirs, str(root), steps=steps, **over)[1:]  # run=False: no subcommand
    cli = DreamBoothCLI(args=args, run=False)
    cli.trainer.callbacks.insert(0, inject)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def _last(root) -> dict:
    (path,) = Path(root).glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, weights_only=True)


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def test_nan_stops_run_before_it_reaches_a_checkpoint(tiny_base, subject_dirs, tmp_path):
    """Deferred check (every 100 steps) still fires before the step-3 checkpoint write, naming step and term."""
    with pytest.raises(NonFiniteLossError) as err:
        _fit(tiny_base, subject_dirs, tmp_path, 3, NaNPixels([3]), **{"faults.check_every_n_steps": 100})
    msg = str(err.value)
    assert "non-finite loss at step 3 (term: loss, loss_instance)" in msg and "loss_prior" not in msg
    assert "was not overwritten" in msg
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 2 and _all_finite(ckpt["state_dict"])
    assert not list(tmp_path.glob("lightning_logs/*/*.safetensors"))  # no export of a broken run


def test_nan_steps_skipped_up_to_the_limit(tiny_base, subject_dirs, tmp_path):
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradients, update skipped \(1 of"):
        with pytest.raises(NonFiniteLossError, match=r"at step 3 .*1 earlier step\(s\) were skipped"):
            _fit(tiny_base, subject_dirs, tmp_path, 3, NaNPixels([2, 3]), **{"faults.max_nonfinite_skips": 1})
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 2 and _all_finite(ckpt["state_dict"])  # step 2's update was skipped


def test_skip_mode_finishes_and_exports_finite_weights(tiny_base, subject_dirs, tmp_path):
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        _fit(tiny_base, subject_dirs, tmp_path, 2, NaNPixels([2]), **{"faults.max_nonfinite_skips": 2})
    (lora,) = tmp_path.glob("lightning_logs/*/pytorch_lora_weights.safetensors")
    assert _all_finite(load_file(lora)) and _last(tmp_path)["global_step"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_resumable_checkpoint_and_exits(tiny_base, subject_dirs, tmp_path, signum):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(StoppedBySignal) as stop:  # checkpoints only every 100 steps: the signal writes this one
        _fit(tiny_base, subject_dirs, tmp_path, 3, SendSignal(1, signum), **{"checkpoint.every_n_train_steps": 100})
    assert stop.value.code == 128 + signum
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 1 and ckpt["loops"] and ckpt["optimizer_states"]  # a full, resumable state
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C behaves normally again after the run


def test_options_validated():
    with pytest.raises(ValueError, match="check_every_n_steps must be >= 1"):
        FaultTolerance(check_every_n_steps=0)
    with pytest.raises(ValueError, match="max_nonfinite_skips must be >= 0"):
        FaultTolerance(max_nonfinite_skips=-1)
