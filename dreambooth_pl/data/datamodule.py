"""LightningDataModule: the subject's photos interleaved with class-prior images, validated before any model loads."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from .cache import DEVICE_CACHE_BYTES, CacheMode, CachedBucketedStream, CachedStream, Encoders, build_cache
from .class_images import draw_class_images, drawn_here
from .bounds import check_bounds
from .datasets import ImageSet, PairedStream
from .faces import uses_masks
from .images import ImageIntakeError, check_images, find_instance_images, list_images
from .settings import CropSettings, MaskSettings, PhotoSettings, PriorSettings, as_group, check_data
from .validation import HeldOutSet, check_validation_schedule, hold_out
from ..settings import plain


@dataclass(frozen=True)
class DataShape:
    """What a step's memory depends on in the data: the training side and the images per step.

    Args:
        resolution: training side in pixels.
        images: images per step (instance images, plus as many class images with prior preservation).
    """

    resolution: int = 1024
    images: int = 2


class DreamBoothDataModule(L.LightningDataModule):
    """Instance images + prompt, and (with prior preservation) class images + prompt.

    The settings come in typed groups (data/settings.py, which says why the arguments below them stay flat), each
    checked when built; ``hparams`` holds them as plain dicts (what a checkpoint stores), the attributes ``photos``,
    ``priors``, ``crops`` and ``masks`` as dataclasses.

    Args:
        photos: the subject's photos, their prompt, how many to use and to hold out (settings.PhotoSettings).
        priors: prior preservation: the class images, their prompt and count, drawing the missing ones
            (settings.PriorSettings).
        crops: centre, face or random crops, flips and aspect buckets (settings.CropSettings).
        masks: per-pixel weights of the instance loss (settings.MaskSettings).
        resolution: square training side in pixels (a multiple of 8: the VAE downsamples by 8); with
            ``crops.aspect_buckets`` the buckets hold about ``resolution²`` pixels.
        batch_size: instance images per step (each brings one class image along).
        num_workers: dataloader worker processes.
        seed: seed of data order and augmentation (linked from ``seed_everything``).
        strict_images: refuse to start when any image (photo or class image) is unusable, listing them all
            (default); false skips them with a warning (data/images.py, docs/reliability.md).
        caption_dropout: probability that an example (instance or class) trains on the empty prompt, drawn per
            example from the seed (``datasets.dropped_caption``).
        base_model: the base that draws missing class images (linked from ``model.base_model`` by the CLI).
        vae_model: its separate VAE, if any (linked from ``model.vae_model``).
        latent_cache: a folder that keeps the cache's latents between runs (``model.perf.cache``;
            data/latent_store.py): a later run on the same images reads them instead of encoding. ``auto``: the
            shared ``~/.cache/dreambooth_pl/latents`` when the cache encodes on a GPU, off on a CPU; None: off.
    """

    def __init__(self, photos: PhotoSettings, priors: PriorSettings = PriorSettings(),
                 crops: CropSettings = CropSettings(), masks: MaskSettings = MaskSettings(), resolution: int = 1024,
                 batch_size: int = 1, num_workers: int = 0, seed: int = 0, strict_images: bool = True,
                 caption_dropout: float = 0.0, base_model: Optional[str] = None, vae_model: Optional[str] = None,
                 latent_cache: Optional[str] = "auto"):
        super().__init__()
        groups = {name: as_group(name, value) for name, value in
                  (("photos", photos), ("priors", priors), ("crops", crops), ("masks", masks))}
        self.photos, self.priors, self.crops, self.masks = groups.values()
        self.save_hyperparameters()
        self.hparams.update(plain(groups))  # plain data: a checkpoint is read with weights_only
        check_data(resolution, batch_size, caption_dropout, self.priors)
        if latent_cache not in (None, "auto") and not (base_model or vae_model):
            raise ValueError("data.latent_cache needs data.base_model (the CLI links it from model.base_model) to "
                             "key the latents by their VAE.")
        gen, crops = self.priors.generation, self.crops
        check_bounds({"resolution": resolution, "crops.bucket_step": crops.bucket_step,
                      "crops.bucket_max_ratio": crops.bucket_max_ratio, "batch_size": batch_size,
                      "num_workers": num_workers, "priors.num_images": self.priors.num_images,
                      "photos.num_images": self.photos.num_images,
                      "priors.generation.sampler.steps": gen.sampler.steps,
                      "priors.generation.batch_size": gen.batch_size,
                      "priors.generation.resolution": gen.resolution})
        self.faces = None  # instance path -> face box, when data.crops.around or data.masks.source asks for faces
        self.buckets = None  # instance path -> (height, width) bucket, with data.crops.aspect_buckets
        if crops.aspect_buckets:
            from .buckets import bucket_table

            bucket_table(resolution, crops.bucket_step, crops.bucket_max_ratio)  # bad values fail before any model
        self.instance: ImageSet | None = None
        self.prior: ImageSet | None = None
        self.held_out = None  # a HeldOutSet with data.photos.held_out
        self.cache = None  # an InputCache, built by cache_inputs when model.perf.cache is on
        self.timings: dict[str, float] = {}  # seconds of "priors" and "cache" (the end-of-fit summary prints them), and
        # the image counts "n_images" and "n_priors"

    def shape(self) -> DataShape:
        """The resolution and images per step this module feeds (``memory_plan.resolve_perf`` plans with it)."""
        hp = self.hparams
        return DataShape(hp.resolution, hp.batch_size * (2 if self.priors.enabled else 1))

    def setup(self, stage: str | None = None) -> None:
        """Find and decode every image now, so bad input fails before the models load."""
        if self.instance is not None:
            return
        hp, photos, priors, crops, masks = self.hparams, self.photos, self.priors, self.crops, self.masks
        inst = find_instance_images(photos.dir, photos.num_images, hp.resolution, hp.strict_images, masks.source,
                                    masks.floor)
        inst, held_inst = hold_out(inst, photos.held_out, "instance")
        self.instance = ImageSet(tuple(inst), photos.prompt)
        if crops.around == "face" or masks.source == "face":
            self.faces = detect_faces(self.instance.paths, crops.around == "face")
        if crops.aspect_buckets:
            self.buckets = assign_buckets(self.instance.paths, hp.resolution, crops.bucket_step,
                                          crops.bucket_max_ratio)
        if priors.enabled and priors.generate:
            self._generate_class_images()
        try:
            self._find_priors(held_inst)
        except BaseException:  # the base the draw left for configure_model would stay on the device, unowned
            from ..base_handoff import release

            release()
            raise

    def _find_priors(self, held_inst) -> None:
        """The class images (checked, some held out), the image counts, and the held-out set."""
        hp, photos, priors = self.hparams, self.photos, self.priors
        if priors.enabled:
            try:
                cls = list_images(priors.dir, "class")
            except ImageIntakeError:
                cls = []
            if len(cls) < priors.num_images:
                raise ImageIntakeError(
                    f"class dir {priors.dir!r} has {len(cls)} image(s) but data.priors.num_images is "
                    f"{priors.num_images}. Generate the rest with: python -m dreambooth_pl "
                    f"generate-class-images --base MODEL --prompt {priors.prompt!r} --out {priors.dir} "
                    f"--num {priors.num_images}, or set data.priors.generate: true (or lower "
                    "data.priors.num_images).")
            cls = cls[: priors.num_images]
            fresh = {p for p in cls if drawn_here(p, hp.resolution)}  # drawn by this process: whole, RGB, large
            usable = set(check_images([p for p in cls if p not in fresh], "class", hp.resolution, hp.strict_images))
            cls = [p for p in cls if p in fresh or p in usable]
            cls, held_cls = hold_out(cls, photos.held_out, "class")
            self.prior = ImageSet(tuple(cls), priors.prompt)
        # counts beside the seconds: the training images and the priors among them, which the check and the cache
        # scale with (the end-to-end benchmark extrapolates by them)
        self.timings["n_priors"] = len(self.prior.paths) if self.prior else 0
        self.timings["n_images"] = len(self.instance.paths) + self.timings["n_priors"]
        if photos.held_out:
            self.held_out = HeldOutSet(ImageSet(tuple(held_inst), photos.prompt),
                                       ImageSet(tuple(held_cls), priors.prompt) if self.prior else None,
                                       hp.resolution)

    def cache_inputs(self, encoders: Encoders, mode: CacheMode, offload: bool = True) -> None:
        """Pre-encode this module's images (and prompts, ``mode="all"``) with ``encoders`` and keep the result for
        the training stream (``model.perf.cache``, data/cache.py); a second call keeps the first result.

        Args:
            encoders: the training module's encoders, on its device (each rank encodes its own copy under DDP).
            mode: ``latents`` or ``all``.
            offload: move the encoders to the CPU once their part is done (see ``build_cache``).
        """
        if self.cache is not None:
            return
        self.setup("fit")  # a no-op after Lightning's own call: the images are found and checked once
        start = time.perf_counter()
        device = next(encoders.vae.parameters()).device
        store = self._latent_store(encoders)
        # mirrored latents only where training flips (the recipe does not: half the cache's VAE encodes)
        self.cache = build_cache(encoders, self.instance, self.prior, self.hparams.resolution, mode, offload,
                                 self.buckets, empty_prompt=self.hparams.caption_dropout > 0,
                                 mirrored=self.crops.flip > 0, store=store)
        if store is not None:
            self.timings.update(n_images_from_store=store.hits, n_images_encoded=store.misses)
        # on the GPU the batches are stacked there: no per-step collate, pinning and copy on the host, which
        # otherwise cost tens of ms a step beside a CUDA-graph step (BENCHMARKS.md); workers need CPU tensors
        if device.type == "cuda" and self.hparams.num_workers == 0 and self.cache.nbytes() <= DEVICE_CACHE_BYTES:
            self.cache = self.cache.to(device)
        self.timings["cache"] = time.perf_counter() - start

    def _latent_store(self, encoders: Encoders):
        """``data.latent_cache``'s store for this run's VAE and encode, or None when it is off."""
        hp = self.hparams
        if hp.latent_cache is None or not (hp.base_model or hp.vae_model):  # auto without a base to key by: off
            return None
        from ..sdxl import resolve_base
        from .latent_store import open_store
        from .prior_cache import vae_root

        vae = vae_root(hp.vae_model) if hp.vae_model else str(Path(resolve_base(hp.base_model)) / "vae")
        rank0 = self.trainer is None or self.trainer.global_rank == 0  # every rank encodes the same images
        return open_store(hp.latent_cache, vae, encoders.vae, encoders.one_per_call, write=rank0,
                          images_per_call=encoders.per_call)

    def _generate_class_images(self) -> None:
        """Fill priors.dir up to priors.num_images with the base; local rank 0 draws, the other ranks wait."""
        hp, priors, trainer = self.hparams, self.priors, self.trainer
        if not hp.base_model:
            raise ValueError("data.priors.generate needs data.base_model (the CLI links it from model.base_model).")
        start = time.perf_counter()
        if trainer is None or trainer.local_rank == 0:
            self._check_class_dir_before_drawing()
            s = priors.generation
            if s.resolution is None:
                s = dataclasses.replace(s, resolution=hp.resolution)
            # the sampler's base is left for configure_model's load, which takes it where dtype and device match
            draw_class_images(hp.base_model, priors.prompt, priors.dir, priors.num_images, s, None,
                              str(trainer.strategy.root_device) if trainer else None, hp.vae_model,
                              leave_base=trainer is not None)
        if trainer is not None:
            trainer.strategy.barrier("generate_class_images")
        self.timings["priors"] = time.perf_counter() - start

    def _check_class_dir_before_drawing(self) -> None:
        """Images already in priors.dir count as drawn, so a bad one must be named now, not after the base has
        loaded and drawn the rest; and a folder that needs images must be writable."""
        from ..io import ensure_writable

        priors = self.priors
        try:
            present = list_images(priors.dir, "class")
        except ImageIntakeError:  # missing or empty: every image will be drawn
            present = []
        if present:
            check_images(present, "class", self.hparams.resolution, self.hparams.strict_images)
        if len(present) < priors.num_images:
            ensure_writable(priors.dir, "data.priors.dir")

    def _consumed_batches(self) -> int:
        """Batches this rank already trained on: a resumed run continues the stream where it stopped."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        hp, crops, masks = self.hparams, self.crops, self.masks
        trainer = self.trainer
        place = dict(start_batch=self._consumed_batches(), rank=trainer.global_rank if trainer else 0,
                     world_size=trainer.world_size if trainer else 1, caption_dropout=hp.caption_dropout)
        face_crop = crops.around == "face"
        faces = dict(faces=self.faces, face_crop=face_crop, mask=masks.source, mask_floor=masks.floor)
        if self.cache is not None and (face_crop or uses_masks(self.instance.paths, masks.source)):
            raise ValueError("data.crops.around: face and loss masks need each example's pixels, but "
                             "model.perf.cache pre-encodes centre crops: set model.perf.cache: off, or "
                             "data.crops.around: null and data.masks.source: off.")
        if self.cache is not None and self.buckets is not None:  # pre-encoded at each photo's bucket
            stream = CachedBucketedStream(self.cache, self.buckets, hp.batch_size, crops.flip, hp.seed, **place)
        elif self.cache is not None:  # pre-encoded inputs (model.perf.cache, data/cache.py): same order, no decoding
            stream = CachedStream(self.cache, hp.batch_size, crops.flip, hp.seed, **place)
        elif self.buckets is not None:
            from .buckets import BucketedStream

            stream = BucketedStream(self.instance, self.prior, self.buckets, hp.batch_size, center_crop=crops.center,
                                    flip_p=crops.flip, seed=hp.seed, **place, **faces)
        else:
            stream = PairedStream(self.instance, self.prior, hp.resolution, hp.batch_size, crops.center, crops.flip,
                                  hp.seed, **place, **faces)
        on_gpu = self.cache is not None and self.cache.device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=hp.num_workers,
                          pin_memory=torch.cuda.is_available() and not on_gpu,
                          persistent_workers=hp.num_workers > 0,
                          prefetch_factor=2 if hp.num_workers > 0 else None)

    def val_dataloader(self):
        """The held-out photos, one per batch (``data.photos.held_out``); none without them."""
        if self.held_out is None:
            return []
        check_validation_schedule(self.trainer)
        return DataLoader(self.held_out, batch_size=None, num_workers=0)


def detect_faces(paths, for_crop: bool) -> dict:
    """Face box (or None) of every instance photo; one note lists the photos without a face."""
    from lightning.pytorch.utilities import rank_zero_info

    from .faces import detect_face
    from .images import load_rgb

    faces = {p: detect_face(load_rgb(p)) for p in paths}
    missing = [p.name for p, box in faces.items() if box is None]
    if missing:
        rank_zero_info(f"no face found in {len(missing)} of {len(paths)} instance photo(s): {', '.join(missing)}; "
                       + ("centre crop and " if for_crop else "") + "no face mask for those.")
    return faces


def assign_buckets(paths, resolution: int, step: int, max_ratio: float) -> dict:
    """Each instance photo's aspect bucket; logs the bucket table with how many photos fell in each."""
    from lightning.pytorch.utilities import rank_zero_info

    from .buckets import bucket_photos

    buckets, table = bucket_photos(paths, resolution, step, max_ratio, used_only=True)
    rank_zero_info(table)
    return buckets
