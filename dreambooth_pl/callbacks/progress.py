"""What a user sees of a fit: a ``step N/max_steps`` bar with the loss, and one summary when fit ends.

Lightning's bars count batches per epoch, which a step-budgeted DreamBooth run does not have (``Epoch 0/-2``,
``30/9`` after a resume); this one counts optimizer steps from where the run stands.
"""
from __future__ import annotations

import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only


class StepProgressBar(ProgressBar):
    """``step N/max_steps`` with the latest loss and s/step (tqdm), on global rank 0."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            from tqdm.auto import tqdm

            total = trainer.max_steps if trainer.max_steps > 0 else None
            self._bar = tqdm(total=total, initial=trainer.global_step, desc="step", unit="step", dynamic_ncols=True,
                             bar_format="{desc} {n}/{total} {bar} [{elapsed}<{remaining}, {rate_inv_fmt}]{postfix}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._bar is None or trainer.global_step == self._bar.n:  # mid-accumulation: no step yet
            return
        self._bar.update(trainer.global_step - self._bar.n)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:  # float(loss) syncs: only when logged
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self._bar.set_postfix_str(f"loss {float(loss):.4f}", refresh=False)
        if self._bar.total is not None and self._bar.n >= self._bar.total:  # before Lightning's closing messages
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunSummary(L.Callback):
    """When fit ends (rank 0): where the LoRA, checkpoint and TensorBoard run are, steps, time, s/step, peak GPU
    memory, the final loss, and the commands to resume and to sample."""

    def __init__(self):
        self._start, self._first_step = 0.0, 0
        self._log_dir, self._lora, self._last = ".", None, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from .export import LoRAExport

        self._start, self._first_step = time.perf_counter(), trainer.global_step
        # trainer.log_dir broadcasts under DDP: read it here, where every rank runs, not in the rank-0 summary
        from ..runs import RunDir

        run = RunDir.of(trainer)
        self._log_dir, self._last = str(run.path), str(run.last_ckpt)
        export = next((cb for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None)
        self._lora = export.path(trainer) if export is not None else None

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.global_step - self._first_step
        seconds = time.perf_counter() - self._start
        log_dir, lora = self._log_dir, self._lora
        last = self._last if any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks) else None
        loss = trainer.callback_metrics.get("train/loss")
        lines = [f"fit {'stopped' if trainer.interrupted else 'finished'}: step {trainer.global_step}"
                 + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")
                 + f", {steps} step(s) in {seconds:.0f} s" + (f" ({seconds / steps:.3f} s/step)" if steps else "")
                 + (f", final loss {float(loss):.4f}" if loss is not None else "")]
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            lines.append(f"  peak GPU memory: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
        if lora and os.path.exists(lora) and not trainer.interrupted:
            lines.append(f"  LoRA:        {lora}")
        if last and os.path.exists(last):
            lines.append(f"  checkpoint:  {last}")
        lines.append(f"  TensorBoard: tensorboard --logdir {os.path.dirname(log_dir) or '.'}")
        config = os.path.join(log_dir, "config.yaml")
        if last and os.path.exists(config):
            lines.append(f"  resume:      python -m dreambooth_pl fit --config {config} --ckpt_path last")
        if lora and os.path.exists(lora) and not trainer.interrupted:
            dm = getattr(trainer, "datamodule", None)
            prompt = dm.hparams.instance_prompt if dm is not None else "a photo of sks dog"
            lines.append(f"  sample:      python -m dreambooth_pl sample --base {pl_module.hparams.base_model} "
                         f"--lora {lora} --prompt \"{prompt}\"")
        print("\n".join(lines), flush=True)


class PlainModelSummary(ModelSummary):
    """Lightning's text model summary (Lightning picks the Rich one whenever rich is installed), without the FLOPs
    column when nothing counted FLOPs: they read 0 for every frozen SDXL part."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                               total_training_modes, total_flops, **summarize_kwargs)
