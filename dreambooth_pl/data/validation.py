"""Held-out validation photos (``data.photos.held_out``): the last N subject photos, and the last N class images
with prior preservation, leave training and come back as a fixed validation set (sd-scripts' ``validation_split``,
SimpleTuner's eval loss, OneTrainer's validation concept).

Each held-out image is one validation batch, centre-cropped and unflipped, with a stable ``val_id``; the loss on
it uses noise and timesteps fixed per ``val_id`` (``dreambooth_pl/validation.py``), so the curve is comparable
across steps and runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .datasets import ImageSet, collate
from .images import load_rgb
from .transforms import prepare_image


def hold_out(paths: Sequence[Path], n: int, what: str) -> tuple[list[Path], list[Path]]:
    """``(training, held out)``: the last ``n`` of ``paths`` (in their sorted order) are held out.

    Args:
        paths: the images, sorted.
        n: ``data.photos.held_out``.
        what: ``instance`` or ``class``, for the message when too few remain.
    """
    paths = list(paths)
    if n < 0:
        raise ValueError(f"data.photos.held_out must be >= 0, got {n}")
    if n and n >= len(paths):
        raise ValueError(f"data.photos.held_out={n} would hold out all {len(paths)} {what} image(s): keep at least "
                         f"one for training (set it to at most {len(paths) - 1}, or add {what} images).")
    return (paths[:len(paths) - n], paths[len(paths) - n:]) if n else (paths, [])


class HeldOutSet(Dataset):
    """The held-out images as one-example batches: instance photos first (``val_id`` 0, 1, ...), then class images
    (``val_id`` 1_000_000 + k), each centre-cropped at ``resolution`` without a flip.

    Args:
        instance: held-out subject photos and their prompt.
        prior: held-out class images and their prompt (None without prior preservation).
        resolution: square side, as training uses.
    """

    CLASS_ID = 1_000_000

    def __init__(self, instance: ImageSet, prior: ImageSet | None, resolution: int):
        self.items = [(instance, i, 0) for i in range(len(instance.paths))]
        self.items += [(prior, i, 1) for i in range(len(prior.paths))] if prior else []
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        images, i, role = self.items[k]
        ex = prepare_image(load_rgb(images.paths[i]), self.resolution, True, False, torch.Generator())
        ex.update(prompt=images.prompt_for(i), is_prior=bool(role))
        batch = collate([ex])
        batch["val_id"] = torch.tensor([role * self.CLASS_ID + i])
        return batch


def check_validation_schedule(trainer) -> None:
    """Refuse a validation schedule that never runs: the training stream is endless, so it has no epoch end at
    which a fractional ``val_check_interval`` would fall.

    Args:
        trainer: the fitting trainer (None: nothing to check).
    """
    interval = getattr(trainer, "val_check_interval", None)
    if trainer is not None and not isinstance(interval, int):
        raise ValueError(f"data.photos.held_out needs trainer.val_check_interval as a number of steps (e.g. 50), "
                         f"got {interval!r}: the training stream is endless, so validation at an epoch's fraction "
                         "never comes.")
