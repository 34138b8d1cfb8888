"""Subject/prior pairing as a deterministic stream of batches, so a resumed run sees exactly the same data."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .faces import Box, face_centre, face_ellipse, load_mask, mask_file, uses_masks, weights_from_mask
from .images import caption_for, load_rgb
from ..noise import example_id, mix_seed
from .transforms import prepare_image


@dataclass(frozen=True)
class ImageSet:
    """Image files with the prompt used for each (a caption file beside an image overrides ``prompt``)."""

    paths: tuple[Path, ...]
    prompt: str

    def prompt_for(self, i: int) -> str:
        return caption_for(self.paths[i]) or self.prompt


CAPTION_SALT = 0xCA7  # caption dropout draws from its own stream: crops and flips stay as without it


def dropped_caption(seed: int, position: int, role: int, p: float) -> bool:
    """Whether the example at global ``position`` (``role`` 0 instance, 1 class) trains on the empty prompt:
    ``u < p`` with ``u`` the first uniform draw of a generator seeded ``mix_seed(seed, position, role, CAPTION_SALT)``
    (caption dropout, as kohya's ``caption_dropout_rate``; the model also learns the unconditional prediction
    that classifier-free guidance subtracts, Ho & Salimans 2022).

    Args:
        seed: the stream's seed.
        position: the example's global sample position.
        role: 0 for the instance example, 1 for its class partner.
        p: ``data.caption_dropout``.
    """
    if p <= 0:
        return False
    gen = torch.Generator().manual_seed(mix_seed(seed, position, role, CAPTION_SALT))
    return bool(torch.rand((), generator=gen) < p)


class PairedStream(IterableDataset):
    """Endless batches pairing each instance example with a class-prior example (DreamBooth, eq. 2).

    Sample position ``p`` of the global stream lies in epoch ``e = p // N`` with ``N = max(#instance, #class)``;
    a seeded permutation of ``range(N)`` per epoch gives index ``k``, and the pair is
    (instance ``k % #instance``, class ``k % #class``): every class image once per epoch, instances cycling —
    the pairing of diffusers' ``train_dreambooth_lora_sdxl.py``. Without a class set, ``N = #instance``.
    Augmentation randomness is a function of (seed, p), so batch ``b`` is the same whether or not the run was
    interrupted. Batches are split across DDP ranks (``b * world + rank``) and dataloader workers.

    Args:
        instance: the subject's images and prompt.
        prior: the class images and prompt, or None without prior preservation.
        resolution: square training side.
        batch_size: pairs per batch (a batch holds ``2 * batch_size`` examples with priors).
        center_crop: centre instead of random crops.
        flip_p: probability of a horizontal flip.
        seed: seed of order and augmentation.
        start_batch: first per-rank batch to yield (set on resume).
        rank, world_size: this process's place in DDP.
        faces: instance path -> detected face box or None (data/faces.py; None: no detection ran).
        face_crop: centre each instance crop on its face (centre crop where none was found).
        mask: ``off``; ``files`` (``photo.mask.png`` where present); ``face`` (those, else a face ellipse).
            Instance examples then carry ``loss_mask`` weights in [``mask_floor``, 1], prior examples ones.
        mask_floor: loss weight outside the mask.
        caption_dropout: probability that an example (instance or class) trains on the empty prompt
            (:func:`dropped_caption`).
    """

    def __init__(self, instance: ImageSet, prior: ImageSet | None, resolution: int, batch_size: int = 1,
                 center_crop: bool = False, flip_p: float = 0.0, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, faces: dict[Path, Box | None] | None = None,
                 face_crop: bool = False, mask: str = "off", mask_floor: float = 0.1, caption_dropout: float = 0.0):
        super().__init__()
        self.caption_dropout = caption_dropout
        self.faces, self.face_crop, self.mask, self.mask_floor = faces or {}, face_crop, mask, mask_floor
        self.masked = uses_masks(instance.paths, mask)
        self.instance, self.prior = instance, prior
        self.resolution, self.batch_size = resolution, batch_size
        self.center_crop, self.flip_p, self.seed = center_crop, flip_p, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        n_prior = len(prior.paths) if prior else 0
        self.epoch_len = max(len(instance.paths), n_prior)

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.epoch_len, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def pair_indices(self, position: int) -> tuple[int, int | None]:
        """(instance index, class index or None) of global sample ``position``."""
        k = int(self._permutation(position // self.epoch_len)[position % self.epoch_len])
        return k % len(self.instance.paths), (k % len(self.prior.paths) if self.prior else None)

    def _example(self, images: ImageSet, i: int, position: int, role: int, size: tuple[int, int] | None = None) -> dict:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, position, role))
        flip = bool(torch.rand((), generator=gen) < self.flip_p)
        img, box, focus, mask = load_rgb(images.paths[i]), None, None, None
        if not role:
            box = self.faces.get(images.paths[i])
            focus = face_centre(box, img.size) if self.face_crop and box else None
            mask = self._mask(images.paths[i], img.size, box) if self.masked else None
        center = self.center_crop or (self.face_crop and not role)  # no face found: centre, not random
        ex = prepare_image(img, size or self.resolution, center, flip, gen, focus, mask)
        if self.masked:
            ex["loss_mask"] = (weights_from_mask(ex["loss_mask"], self.mask_floor) if "loss_mask" in ex
                               else torch.ones(1, *ex["pixel_values"].shape[-2:]))
        ex["prompt"] = self._prompt(images, i, position, role)
        ex["is_prior"] = bool(role)
        ex["example_id"] = example_id(position, role)  # keys its training noise (NoiseSchedule.draw)
        return ex

    def _prompt(self, images: ImageSet, i: int, position: int, role: int) -> str:
        """The example's prompt, or ``""`` where caption dropout drops it."""
        return "" if dropped_caption(self.seed, position, role, self.caption_dropout) else images.prompt_for(i)

    def _mask(self, path: Path, size: tuple[int, int], box: Box | None):
        """The mask file beside ``path``, else (``mask: face``) an ellipse around its face, else None."""
        side = mask_file(path) if self.mask != "off" else None
        if side is not None:
            return load_mask(side, size)
        return face_ellipse(box, size) if self.mask == "face" and box else None

    def batch(self, b: int) -> dict:
        """Per-rank batch number ``b``, collated: instance examples first, then their prior partners."""
        first = (b * self.world_size + self.rank) * self.batch_size
        inst, prior = [], []
        for position in range(first, first + self.batch_size):
            i, c = self.pair_indices(position)
            inst.append(self._example(self.instance, i, position, 0))
            if c is not None:
                prior.append(self._example(self.prior, c, position, 1))
        return self._collate(inst + prior)

    @staticmethod
    def _collate(examples: list[dict]) -> dict:
        return collate(examples)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + worker
        while True:  # DataLoader takes workers round-robin, so the batch order stays b, b+1, ...
            yield self.batch(b)
            b += workers


def collate(examples: list[dict]) -> dict:
    """Stack examples into the batch dict the LightningModule's ``training_step`` reads."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "prompt": [e["prompt"] for e in examples],
        "original_size": torch.tensor([e["original_size"] for e in examples]),
        "crop_top_left": torch.tensor([e["crop_top_left"] for e in examples]),
        "is_prior": torch.tensor([e["is_prior"] for e in examples]),
        # a list, not a tensor: Lightning leaves it on the host, where seeding the examples' generators reads it
        # (held-out photos have none: their noise is fixed per photo, validation.py)
        **({"example_id": [e["example_id"] for e in examples]} if "example_id" in examples[0] else {}),
        **({"loss_mask": torch.stack([e["loss_mask"] for e in examples])} if "loss_mask" in examples[0] else {}),
    }
