"""Validation grids during fit: fixed prompts and seeds every N steps, logged to TensorBoard (and saved as PNG).

At the start of training the same prompts are drawn once from the base without LoRA (peft's
``disable_adapters``), so every later grid has its reference. Sampling runs on global rank 0 under
``torch.no_grad`` with forked RNG state; adapter switches, train/eval modes and ``requires_grad`` flags are
restored afterwards, so the callback never changes weights or the training run's randomness.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from ..sampling import SAMPLER, SamplerSettings


class SampleGrid(L.Callback):
    """Log a grid of ``prompts`` x fixed seeds every ``every_n_steps`` optimizer steps.

    Args:
        prompts: prompts to draw (None: the datamodule's instance prompt).
        every_n_steps: optimizer steps between grids (0: only the base grid and the final grid).
        images_per_prompt: images per prompt (image j of prompt i uses seed ``seed + i * images_per_prompt + j``).
        seed: first seed.
        sampler: scheduler, steps, guidance and negative prompt (``sampling.SamplerSettings``; few steps: a grid
            costs ``len(prompts) * images_per_prompt * sampler.steps`` UNet calls x 2).
        resolution: square side in pixels, a multiple of 8 (None: the base's native size).
        log_base: draw the same prompts from the base without LoRA once, at the start of training.
        save_png: also write each grid as ``<log_dir>/samples/<tag>_step<N>.png``.
    """

    def __init__(self, prompts: Optional[list[str]] = None, every_n_steps: int = 250, images_per_prompt: int = 1,
                 seed: int = 0, sampler: SamplerSettings = SAMPLER, resolution: Optional[int] = None,
                 log_base: bool = True, save_png: bool = True):
        from ..sampling import check_size

        if every_n_steps < 0 or images_per_prompt < 1:
            raise ValueError(f"SampleGrid needs every_n_steps >= 0 and images_per_prompt >= 1, got "
                             f"{every_n_steps}, {images_per_prompt}")
        check_size(resolution, resolution)  # the sampler checked its own values: all fail at start-up
        self.prompts, self.every_n_steps, self.images_per_prompt = prompts, every_n_steps, images_per_prompt
        self.seed, self.sampler, self.resolution = seed, sampler, resolution
        self.log_base, self.save_png = log_base, save_png
        self._last_step = -1
        self._cache: tuple = (None, [])

    def drawn_prompts(self, trainer: L.Trainer) -> list[str]:
        """The prompt of each image :meth:`draw` returns, in order (what SubjectMetrics scores the images against)."""
        prompts = self.prompts
        if not prompts:
            dm = getattr(trainer, "datamodule", None)
            prompts = [dm.photos.prompt] if dm is not None else ["a photo of sks dog"]
        return [p for p in prompts for _ in range(self.images_per_prompt)]

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, adapters: bool = True) -> list:
        """The grid's images from the module's live models, with or without its adapters; weights untouched.

        Cached per (step, adapters): another callback scoring the same samples (SubjectMetrics) does not redraw.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..devices import borrowed
        from ..sampling import generate, pipeline_from_module

        key = (trainer.global_step if trainer is not None else None, adapters)
        if key[0] is not None and self._cache[0] == key:
            return self._cache[1]
        prompts = self.drawn_prompts(trainer)
        seeds = [self.seed + k for k in range(len(prompts))]
        models = (pl_module.unet, pl_module.text_encoder, pl_module.text_encoder_2)
        # peft's per-layer switch (what diffusers' and transformers' disable_adapters call), with each layer's state
        layers = [(m, m.disable_adapters) for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
        grads = [(p, p.requires_grad) for m in models for p in m.parameters()]
        # every submodule's own mode: train() is recursive and would flip frozen parts that the run keeps in eval
        modes = [(m, m.training) for model in (*models, pl_module.vae) for m in model.modules()]
        device = pl_module.device
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        # the frozen base is half under 16-/bf16-mixed while the adapters stay fp32: sample under the same autocast
        # that trains them (the VAE decode turns it off again); cached runs moved the encoders off the device
        half = pl_module.weight_dtype()
        autocast = torch.autocast(device.type, dtype=half, enabled=half != torch.float32)
        encoders = borrowed((pl_module.vae, pl_module.text_encoder, pl_module.text_encoder_2), device)
        ema = getattr(pl_module, "averaged_weights", contextlib.nullcontext)()  # EMA adapters if model.ema.decay
        with rng, ema, torch.no_grad(), encoders, autocast:
            try:
                for m, _ in modes:
                    m.training = False
                if not adapters:
                    for layer, _ in layers:
                        layer.enable_adapters(False)
                pipe = pipeline_from_module(pl_module, self.sampler.scheduler)
                # model.pivotal: the identifier is its new tokens; the base (no adapters) gets the prompt as written
                pivotal = getattr(pl_module, "pivotal", None) if adapters else None
                images = generate(pipe, [pivotal.rewrite(p) for p in prompts] if pivotal else prompts, seeds,
                                  self.sampler.steps, self.sampler.guidance, self.sampler.negative_prompt,
                                  self.resolution, self.resolution, batch_size=len(prompts))
                self._cache = (key, images)
                return images
            finally:
                if not adapters:
                    for layer, was_disabled in layers:
                        layer.enable_adapters(not was_disabled)
                for m, training in modes:
                    m.training = training
                for p, flag in grads:  # peft's enable/disable toggles requires_grad; put the run's flags back
                    p.requires_grad_(flag)

    def log_grid(self, trainer: L.Trainer, images: list, tag: str) -> None:
        """Log ``images`` as one grid to every logger that takes images; optionally save it as PNG."""
        import numpy as np
        from torchvision.utils import make_grid

        from ..io import save_image

        tensors = [torch.from_numpy(np.asarray(img)).permute(2, 0, 1) for img in images]
        # one row per prompt when there are several images per prompt, else all prompts side by side
        grid = make_grid(tensors, nrow=self.images_per_prompt if self.images_per_prompt > 1 else len(images))
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, global_step=step)
            elif hasattr(logger, "log_image"):  # Weights & Biases, Neptune, ...
                with contextlib.suppress(TypeError):
                    logger.log_image(key=tag, images=[grid.permute(1, 2, 0).numpy()], step=step)
        if self.save_png:
            from PIL import Image

            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "samples")
            os.makedirs(folder, exist_ok=True)
            image = Image.fromarray(grid.permute(1, 2, 0).numpy())
            save_image(os.path.join(folder, f"{tag.replace('/', '_')}_step{step:06d}.png"), image)

    def _grid(self, trainer: L.Trainer, pl_module: L.LightningModule, adapters: bool) -> None:
        tag = "samples/lora" if adapters else "samples/base"
        self.log_grid(trainer, self.draw(trainer, pl_module, adapters), tag)
        rank_zero_info(f"SampleGrid: logged {tag} at step {trainer.global_step}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_base and trainer.is_global_zero:
            self._grid(trainer, pl_module, adapters=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (trainer.is_global_zero and self.every_n_steps and step % self.every_n_steps == 0
                and step != self._last_step):
            self._last_step = step
            self._grid(trainer, pl_module, adapters=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.global_step != self._last_step and not trainer.interrupted:
            self._last_step = trainer.global_step
            self._grid(trainer, pl_module, adapters=True)
