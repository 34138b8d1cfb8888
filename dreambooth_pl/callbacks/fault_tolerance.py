"""Runs that survive faults: a stop signal saves a resumable checkpoint and exits; a NaN never reaches a checkpoint.

The non-finite check keeps a flag on the device (no host sync per step) and reads it every
``check_every_n_steps`` steps and always before a checkpoint is written, at the end of an epoch and before a
signal stop. A non-finite step therefore never overwrites the last good checkpoint or produces an export.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

TERMS = ("loss", "loss_instance", "loss_prior")  # what DreamBoothLoRA.training_step returns


class NonFiniteLossError(SystemExit):
    """Training stopped on a NaN/inf loss. A ``SystemExit`` so the CLI prints the message (exit status 1) after
    Lightning's teardown instead of a traceback."""


class StoppedBySignal(SystemExit):
    """Training stopped on SIGTERM/SIGINT after writing a resumable checkpoint; exit status 128 + signal number."""


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks (:meth:`RunDir.of`; a collective under DDP)."""
    from ..runs import RunDir

    return RunDir.of(trainer).last_ckpt


class FaultTolerance(L.Callback):
    """Stop signals -> resumable ``last.ckpt`` + clean exit; non-finite loss -> stop (or skip) with step and term.

    Args:
        check_every_n_steps: read the on-device non-finite flag every this many steps (1: every step, one host
            sync each). Checkpoint writes, epoch ends and signal stops always check first, whatever this is.
        max_nonfinite_skips: 0 (default) stops at the first non-finite loss; N > 0 skips the optimizer update
            of up to N such steps (a warning each) and stops at N + 1 — this reads the loss every step.
        save_on_signal: on SIGTERM (Colab stop, ``kill``, SLURM) or SIGINT (Ctrl-C), finish the current step,
            write ``last.ckpt`` and exit with status 128 + signal number; a second Ctrl-C aborts at once.
    """

    def __init__(self, check_every_n_steps: int = 10, max_nonfinite_skips: int = 0, save_on_signal: bool = True):
        if check_every_n_steps < 1:
            raise ValueError(f"faults.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        if max_nonfinite_skips < 0:
            raise ValueError(f"faults.max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}")
        self.check_every_n_steps, self.max_nonfinite_skips = check_every_n_steps, max_nonfinite_skips
        self.save_on_signal = save_on_signal
        self.skipped = 0
        self._first_bad: Optional[torch.Tensor] = None  # per term: first step with a non-finite value, -1 if none
        self._terms: tuple[str, ...] = ()
        self._loss: Optional[torch.Tensor] = None
        self._skip_record = False  # this step's update was skipped: its NaN must not stop the run
        self._signal: Optional[int] = None
        self._old_handlers: dict = {}

    # ---- non-finite loss -----------------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """With ``max_nonfinite_skips``: drop this step's gradients (AdamW skips parameters without one)."""
        if not self.max_nonfinite_skips or self._loss is None:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.isfinite(self._loss).all()
        if grads:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        bad = trainer.strategy.reduce_boolean_decision(not bool(finite), all=False)
        self._loss = None
        if not bad:
            return
        self.skipped += 1
        if self.skipped > self.max_nonfinite_skips:
            self._raise_nonfinite(trainer, f"step {trainer.global_step + 1}", "loss or gradients",
                                  f"{self.skipped - 1} earlier step(s) were skipped (faults.max_nonfinite_skips: "
                                  f"{self.max_nonfinite_skips})")
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
        rank_zero_warn(f"step {trainer.global_step + 1}: non-finite loss or gradients, update skipped "
                       f"({self.skipped} of faults.max_nonfinite_skips: {self.max_nonfinite_skips})")
        self._skip_record = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if isinstance(outputs, dict) and not self._skip_record:
            self._record(outputs, trainer.global_step)
        self._skip_record = False
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: a checkpoint here would lose the accumulated gradients
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)
        if self.save_on_signal:
            self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer)  # before ModelCheckpoint's end-of-run save and the LoRA export

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.check(trainer)  # runs inside dump_checkpoint, before any byte is written: a NaN never reaches disk

    def _record(self, outputs: dict, step: int) -> None:
        """Remember, on the device, the first step at which each loss term was non-finite (no host sync)."""
        terms = tuple(k for k in TERMS if isinstance(outputs.get(k), torch.Tensor))
        vals = torch.stack([outputs[k].detach().float().reshape(()) for k in terms])
        if self._first_bad is None or self._terms != terms:
            self._first_bad, self._terms = torch.full_like(vals, -1, dtype=torch.long), terms
        first = torch.where(torch.isfinite(vals) | (self._first_bad >= 0), self._first_bad,
                            torch.full_like(self._first_bad, step))
        self._first_bad = first

    def check(self, trainer: L.Trainer) -> None:
        """Read the non-finite flag (one host sync, and one all-reduce in DDP); stop the run if it is set."""
        if self._first_bad is None:
            return
        first = self._first_bad.tolist()
        bad_here = any(s >= 0 for s in first)
        if trainer.world_size > 1:
            bad_here = trainer.strategy.reduce_boolean_decision(bad_here, all=False)
        if not bad_here:
            return
        steps = [s for s in first if s >= 0]
        step = min(steps) if steps else None
        names = [t for t, s in zip(self._terms, first) if s == step] if steps else ["(on another rank)"]
        self._raise_nonfinite(trainer, f"step {step}" if step is not None else "a step on another rank",
                              ", ".join(names))

    def _raise_nonfinite(self, trainer: L.Trainer, where: str, terms: str, extra: str = "") -> None:
        self._first_bad = None  # the error is raised once; teardown saves must not raise it again
        last = last_checkpoint_path(trainer)
        kept = f"the last good checkpoint {last} was not overwritten" if last.exists() else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite loss at {where} (term: {terms}); training stopped and {kept}. {extra + '. ' if extra else ''}"
            "Usual causes: learning rate too high, fp16 overflow (use model.vae_dtype: float32 or "
            "trainer.precision: bf16-mixed), a corrupt image. Resume with --ckpt_path last after the fix, or set "
            "faults.max_nonfinite_skips: N to skip up to N such steps.")

    # ---- stop signals --------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Our handlers replace Lightning's SIGTERM one (restored at the end): Lightning would stop mid-accumulation
        if self.save_on_signal and threading.current_thread() is threading.main_thread():
            self._old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None and signum == signal.SIGINT:  # second Ctrl-C: the user wants out now
            self._restore()
            raise KeyboardInterrupt
        self._signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
              "(Ctrl-C again to abort now) ...", file=sys.stderr)

    def _restore(self) -> None:
        if self._old_handlers and threading.current_thread() is threading.main_thread():
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self._old_handlers = {}

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        signum = self._signal or (signal.SIGTERM if trainer.received_sigterm else None)
        if trainer.world_size > 1:
            signum = signal.SIGTERM if trainer.strategy.reduce_boolean_decision(bool(signum), all=False) else None
        if signum:
            self._save_and_exit(trainer, signum)

    def _save_and_exit(self, trainer: L.Trainer, signum: int) -> None:
        self.check(trainer)
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and path.parent == Path(cb.dirpath or ""):
                cb.last_model_path = str(path)
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            print(f"{name}: saved a resumable checkpoint at step {trainer.global_step} to {path}; resume with "
                  "`python -m dreambooth_pl fit --config <run dir>/config.yaml --ckpt_path last`.", file=sys.stderr)
        self._restore()
        raise StoppedBySignal(128 + signum)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
