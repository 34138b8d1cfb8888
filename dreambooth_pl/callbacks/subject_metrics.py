"""Subject fidelity during fit: score validation samples against the instance photos; log val/clip_i, clip_t, dino
and the face identity (val/face_sim, val/face_match, val/face_none; metrics/face.py) where the subject has a face.

The samples are the :class:`~dreambooth_pl.callbacks.sample_grid.SampleGrid` callback's (same prompts, seeds and
sampler) when one is configured, else this callback's own fixed prompts drawn the same way. Scoring runs on global
rank 0 only (where the samples exist), so the metrics do not sync across processes. The CLIP, DINO and face models load
lazily on first use, frozen, and are never attached to the LightningModule (so never in its checkpoints).
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..sampling import SAMPLER, SamplerSettings
from .sample_grid import SampleGrid


def identifier_from_prompts(instance_prompt: str, class_prompt: Optional[str]) -> Optional[str]:
    """The identifier: the first word of the instance prompt absent from the class prompt (None without one).

    Args:
        instance_prompt: e.g. "a photo of sks dog".
        class_prompt: e.g. "a photo of dog" (then the identifier is "sks").
    """
    if not class_prompt:
        return None
    class_words = set(class_prompt.split())
    return next((w for w in instance_prompt.split() if w not in class_words), None)


class SubjectMetrics(L.Callback):
    """Log CLIP-I, CLIP-T and DINO (DreamBooth, Ruiz et al. 2023, sec. 4.1) of validation samples.

    Args:
        every_n_steps: optimizer steps between scorings (0: only at the end of training).
        token: identifier removed from prompts for CLIP-T (None: :func:`identifier_from_prompts` of the
            datamodule's prompts; without a class prompt, prompts are scored as given).
        instance_dir: real photos to compare with (None: the datamodule's ``instance_dir``).
        prompts: own prompts when no SampleGrid callback is configured (None: the datamodule's instance prompt).
        images_per_prompt: own images per prompt (seed of image k is ``seed + k``).
        seed: first seed of the own samples.
        sampler: scheduler, steps, guidance and negative prompt of the own samples (``sampling.SamplerSettings``).
        resolution: side of the own samples (None: the base's native size).
        clip_weights: CLIP ViT-B/32 weights: ``openai``, a local file, or None (random: tests only).
        dino_weights: DINO ViT-S/16 weights: ``dino``, a local file, or None (random: tests only).
        face_weights: face identity (metrics/face.py): ``dlib`` (the installed face-recognition-models), a folder
            with dlib's two model files, or None (skipped). Nothing is logged for it when no instance photo has
            a face (a non-person subject).
    """

    def __init__(self, every_n_steps: int = 250, token: Optional[str] = None, instance_dir: Optional[str] = None,
                 prompts: Optional[list[str]] = None, images_per_prompt: int = 2, seed: int = 0,
                 sampler: SamplerSettings = SAMPLER, resolution: Optional[int] = None,
                 clip_weights: Optional[str] = "openai", dino_weights: Optional[str] = "dino",
                 face_weights: Optional[str] = "dlib"):
        if every_n_steps < 0:
            raise ValueError(f"SubjectMetrics.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.token, self.instance_dir = every_n_steps, token, instance_dir
        self.clip_weights, self.dino_weights, self.face_weights = clip_weights, dino_weights, face_weights
        # sampling (and its guarantees: no weight change, RNG untouched) is SampleGrid's; this one never logs
        self._own = SampleGrid(prompts, every_n_steps=0, images_per_prompt=images_per_prompt, seed=seed,
                               sampler=sampler, resolution=resolution, log_base=False, save_png=False)
        self._metrics = None
        self._last_step = -1
        self.last_scores: dict[str, float] = {}

    def _sampler(self, trainer: L.Trainer) -> SampleGrid:
        return next((cb for cb in trainer.callbacks if isinstance(cb, SampleGrid)), self._own)

    def _identifier(self, trainer: L.Trainer) -> Optional[str]:
        if self.token is not None:
            return self.token
        dm = getattr(trainer, "datamodule", None)
        photos, priors = getattr(dm, "photos", None), getattr(dm, "priors", None)
        return identifier_from_prompts(getattr(photos, "prompt", None) or "", getattr(priors, "prompt", None))

    def _load(self, trainer: L.Trainer, device: torch.device) -> dict:
        """Embedders and metrics, built on first use; the real photos are embedded once."""
        if self._metrics is None:
            from ..data.images import list_images, load_rgb
            from ..metrics import CLIPIScore, CLIPTScore, DINOScore, load_clip, load_dino

            folder = self.instance_dir or getattr(getattr(getattr(trainer, "datamodule", None), "photos", None),
                                                  "dir", None)
            if not folder:
                raise ValueError("SubjectMetrics needs the subject's photos: set its instance_dir or use the "
                                 "DreamBoothDataModule (data.photos.dir).")
            real = [load_rgb(p) for p in list_images(folder, "instance")]
            clip, dino = load_clip(self.clip_weights, device), load_dino(self.dino_weights, device)
            self._metrics = {"val/clip_i": CLIPIScore(clip, real, sync_on_compute=False),
                             "val/clip_t": CLIPTScore(clip, self._identifier(trainer), sync_on_compute=False),
                             "val/dino": DINOScore(dino, real, sync_on_compute=False)}
            if self.face_weights:
                from ..metrics.face import FaceIdentity

                self._metrics["val/face"] = FaceIdentity(reference=real, weights=self.face_weights,
                                                         sync_on_compute=False)
        return self._metrics

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Draw the validation samples with the current adapters and score them; returns and logs the values."""
        sampler = self._sampler(trainer)
        prompts = sampler.drawn_prompts(trainer)
        images = sampler.draw(trainer, pl_module, adapters=True)
        return self.score_images(trainer, pl_module.device, images, prompts)

    def score_images(self, trainer: L.Trainer, device: torch.device, images: list, prompts: list[str]
                     ) -> dict[str, float]:
        """Score ``images`` (one per prompt in ``prompts``) against the subject's photos; returns and logs the values.

        Args:
            trainer: the trainer whose loggers and step are used.
            device: where the CLIP and DINO models run.
            images: the images (PIL or tensors, as ``metrics.embedders.to_unit_float`` takes).
            prompts: the prompt of each image.
        """
        metrics = self._load(trainer, device)
        scores = {}
        for name, metric in metrics.items():
            metric.reset()
            metric.update(images, prompts) if name == "val/clip_t" else metric.update(images)
            value = metric.compute()
            if isinstance(value, dict):  # the face metric: face_sim, face_match, face_none ({} without a face)
                scores.update({f"val/{k}": float(v) for k, v in value.items()})
            else:
                scores[name] = float(value)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scores.items()})
        self.last_scores, self._last_step = scores, step
        rank_zero_info("SubjectMetrics step {}: {}".format(step, ", ".join(f"{k}={v:.4f}" for k, v in scores.items())))
        return scores

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.score(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.global_step != self._last_step and not trainer.interrupted:
            self.score(trainer, pl_module)
