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


def process_seconds() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


class RunSummary(L.Callback):
    """When fit ends (rank 0): where the LoRA, checkpoint and TensorBoard run are, steps, time, s/step, peak GPU
    memory, the final loss, the commands to resume and to sample, and the run's phases: start (imports, config,
    loading the base), priors (data.priors.generate), cache (model.perf.cache), first step (CUDA-graph
    capture), steps, export. The phases also go to ``phases.json`` in the run folder, with the start split into
    ``start_to_trainer`` (imports and the config), ``start_data`` (the data's setup, priors aside), ``start_load``
    (the base) and ``start_adapters`` (adapters and the memory plan)."""

    def __init__(self):
        self._start, self._first_step = 0.0, 0
        self._log_dir, self._lora, self._last = ".", None, None
        self._marks: dict[str, float] = {"init": process_seconds()}  # seconds since the process started, at each hook
        self.phases: dict[str, float] = {}

    def _mark(self, name: str) -> None:
        self._marks.setdefault(name, process_seconds())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("setup")  # after the data module's setup, which draws missing priors

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_start")  # the base is loaded; the module's own on_fit_start caches next
        # trainer.log_dir broadcasts under DDP: read it here, where every rank runs, not in the rank-0 summary; at
        # fit start, as a finished run resumed never starts training but still prints its paths
        from ..runs import RunDir
        from .export import LoRAExport

        run = RunDir.of(trainer)
        self._log_dir, self._last = str(run.path), str(run.last_ckpt)
        export = next((cb for cb in trainer.callbacks if isinstance(cb, LoRAExport)), None)
        self._lora = export.path(trainer) if export is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if "first_step" not in self._marks and trainer.global_step > self._first_step:
            self._mark("first_step")
        self._marks["last_step"] = process_seconds()

    def _phases(self, trainer: L.Trainer, steps: int) -> dict[str, float]:
        """Seconds per phase from the marks and the data module's own timings, and its image counts (``n_*``)."""
        m, now = self._marks, process_seconds()
        dm = getattr(trainer, "datamodule", None)
        timings = getattr(dm, "timings", {}) or {}
        priors, cache = timings.get("priors", 0.0), timings.get("cache", 0.0)
        train_start = m.get("train_start", now)
        first, last = m.get("first_step", train_start), m.get("last_step", train_start)
        phases = {"start": train_start - priors - cache, "priors": priors, "cache": cache,
                  "first_step": first - train_start, "steps": last - first, "export": now - last,
                  "to_first_step_without_priors": first - priors, "total": now}
        # where the start goes: imports and the config up to the trainer, the data's setup (priors aside), loading
        # the base, injecting adapters and planning memory; the rest is Lightning's own hooks
        load = getattr(getattr(trainer, "lightning_module", None), "timings", {}) or {}
        to_trainer = m.get("init", 0.0)
        data = max(0.0, m.get("setup", to_trainer) - to_trainer - priors)
        phases.update(start_to_trainer=to_trainer, start_data=data, start_load=load.get("load", 0.0),
                      start_adapters=load.get("adapters", 0.0))
        if "kernel_wait" in load:  # inside first_step: the wait for the kernels building since the load
            phases.update(first_step_kernel_wait=load["kernel_wait"], kernel_build=load.get("kernel_build", 0.0))
        # inside first_step: Triton kernels built at their launch (kernel_warmup.py), the CUDA graph's eager warm-up
        # pass and its capture (graphs.py)
        phases.update({f"first_step_{k}": load[k] for k in ("builds", "graph_warmup", "graph_capture") if k in load})
        counts = ("n_images", "n_priors", "n_images_from_store", "n_images_encoded")  # counts beside the seconds
        phases.update({k: timings[k] for k in counts if k in timings})
        if steps > 1:
            phases["s_per_step"] = (last - first) / (steps - 1)
        return {k: round(v, 2) for k, v in phases.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("train_start")
        self._start, self._first_step = time.perf_counter(), trainer.global_step

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = "train_start" in self._marks  # a finished run resumed never starts training
        steps = trainer.global_step - self._first_step if trained else 0
        seconds = time.perf_counter() - self._start if trained else 0.0
        log_dir, lora = self._log_dir, self._lora
        last = self._last if any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks) else None
        loss = trainer.callback_metrics.get("train/loss")
        self.phases = p = self._phases(trainer, steps)
        lines = [f"fit {'stopped' if trainer.interrupted else 'finished'}: step {trainer.global_step}"
                 + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")
                 + f", {steps} step(s) in {seconds:.0f} s" + (f" ({seconds / steps:.3f} s/step)" if steps else "")
                 + (f", final loss {float(loss):.4f}" if loss is not None else "")]
        lines.append(f"  phases:      start {p['start']:.1f} s, priors {p['priors']:.1f} s, cache {p['cache']:.1f} s, "
                     f"first step {p['first_step']:.1f} s, steps {p['steps']:.1f} s, export {p['export']:.1f} s "
                     f"(first step done {p['to_first_step_without_priors']:.1f} s after the process started, "
                     f"priors aside; {p['total']:.1f} s in all)")
        if trained and os.path.isdir(log_dir):  # no phases to keep from a run that trained nothing
            from ..io import write_json

            write_json(os.path.join(log_dir, "phases.json"), p)
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
            prompt = dm.photos.prompt if dm is not None else "a photo of sks dog"
            lines.append(f"  sample:      python -m dreambooth_pl sample --base {pl_module.hparams.base_model} "
                         f"--lora {lora} --prompt \"{prompt}\"")
        print("\n".join(lines), flush=True)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


class ParameterSummary(ModelSummary):
    """One line where Lightning prints its parameter table (6,000+ module rows for SDXL, and a warning that it
    cannot summarise mixed precision): trainable and frozen parameters, and the adapters' size."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = list(pl_module.parameters())
        trainable = [p for p in params if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        size = sum(p.numel() * p.element_size() for p in trainable) / 2**20
        print(f"parameters: {_count(n_train)} trainable ({size:.1f} MiB of adapters), "
              f"{_count(sum(p.numel() for p in params) - n_train)} frozen", flush=True)
