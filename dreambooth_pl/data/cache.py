"""Pre-encoded training inputs: VAE latent distributions of every image (plain, and mirrored where flips are on)
and, optionally, the prompts' text embeddings, so the VAE (and the text encoders) leave the GPU before the first step.

This is the ``--cache_latents`` of diffusers' ``train_dreambooth_lora_sdxl.py``: the latent *distribution*
(mean, std) is stored and a latent is sampled from it every step, so training still sees the VAE's noise.
Crops are centred (a cache cannot hold every random crop); flips keep their per-example probability.

One direction: the training module hands its encoders over as an :class:`Encoders` value to
``DreamBoothDataModule.cache_inputs``, which calls :func:`build_cache` with its own images, buckets and resolution
and keeps the result for its stream (the idea of kohya sd-scripts' ``dataset.cache_latents(vae)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..devices import borrowed, to_cpu
from ..sdxl import encode_prompts, tokenize
from .buckets import BucketedStream
from ..noise import example_id, mix_seed
from .datasets import ImageSet, PairedStream
from .encode import Encoded, EncodedSet, Size, encode_set
from .latent_store import LatentStore

CacheMode = Literal["off", "latents", "all"]
DEVICE_CACHE_BYTES = 512 * 2**20  # a cache up to this size moves to the GPU (about 500 images at 1024²)


class CacheError(ValueError):
    """A cache setting that cannot work; the message says why and what to change."""


@dataclass
class InputCache:
    """Everything a training step reads instead of pixels (and prompts, when ``text`` is filled)."""

    instance: EncodedSet
    prior: EncodedSet | None
    resolution: int
    text: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        sets = [s for s in (self.instance, self.prior) if s is not None]
        return ([t for s in sets for e in s.entries.values() for t in (e.mean, e.std, e.crop_top_left)]
                + [s.original_size for s in sets] + [t for pair in self.text.values() for t in pair])

    @property
    def device(self) -> torch.device:
        return self.instance.original_size.device

    @property
    def mirrored(self) -> bool:
        """Whether every image is also held mirrored (built for flips)."""
        return all(e.mean.shape[0] == 2 for s in (self.instance, self.prior) if s for e in s.entries.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device) -> "InputCache":
        """A copy with every tensor on ``device``."""
        def moved(s: EncodedSet | None) -> EncodedSet | None:
            return None if s is None else EncodedSet(s.images, s.original_size.to(device), {
                k: Encoded(e.mean.to(device), e.std.to(device), e.crop_top_left.to(device)) for k, e in s.entries.items()})
        return InputCache(moved(self.instance), moved(self.prior), self.resolution,
                          {p: (a.to(device), b.to(device)) for p, (a, b) in self.text.items()})


@torch.no_grad()
def encode_texts(text_encoders, tokenizers, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``prompt -> (prompt_embeds [77, d], pooled [d2])`` on the CPU, one forward per distinct prompt."""
    prompts = list(dict.fromkeys(prompts))
    emb, pooled = encode_prompts(text_encoders, [tokenize(t, prompts) for t in tokenizers])
    return {p: (emb[i].cpu(), pooled[i].cpu()) for i, p in enumerate(prompts)}


CACHE_IMAGES_PER_CALL = 4  # with room: bf16 at 1024², 0.034 against 0.052 s/image on an H100 (8: 0.029, 12.6 GiB)


@dataclass(frozen=True)
class Encoders:
    """What the cache encodes with, handed over by the training module (data/cache.py never sees the module).

    Args:
        vae: the image encoder, on the device that encodes.
        text_encoders: SDXL's two text encoders (for ``mode="all"``).
        tokenizers: their tokenizers, in the same order.
        park: modules moved to the CPU while the VAE encodes and back after (the UNet: the VAE's fp32
            activations at 1024² are the run's largest transient).
        one_per_call: the VAE encodes one image per call, not the plain and mirrored pair (``encode.encode_set``).
        images_per_call: images of one size per VAE call (``encode.encode_set``; 1 with ``one_per_call``).
    """

    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple
    park: tuple[torch.nn.Module, ...] = ()
    one_per_call: bool = False
    images_per_call: int = 1

    @property
    def per_call(self) -> int:
        """Images per VAE call as encoded: one where plain and mirrored are already split (``one_per_call``)."""
        return 1 if self.one_per_call else self.images_per_call


def build_cache(encoders: Encoders, instance: ImageSet, prior: ImageSet | None, resolution: int, mode: CacheMode,
                offload: bool = True, buckets: dict | None = None, empty_prompt: bool = False,
                mirrored: bool = True, store: LatentStore | None = None) -> InputCache:
    """Encode the image sets with ``encoders.vae`` (and the prompts with the text encoders for ``mode="all"``),
    moving each encoder to the CPU as soon as its part is done, so the VAE's large transient never meets them.

    Args:
        encoders: the encoders (on the training device) and the modules to park meanwhile.
        instance, prior: the data module's image sets.
        resolution: training side in pixels.
        mode: ``latents`` or ``all``.
        offload: move the encoders that are no longer needed to the CPU, and park ``encoders.park`` meanwhile.
        buckets: instance path -> aspect bucket (``data.crops.aspect_buckets``): each photo is encoded at its bucket,
            each class image at every bucket in use (it is cropped to its partner's).
        empty_prompt: also encode ``""`` (``mode="all"``), the prompt of examples that caption dropout drops.
        mirrored: also encode every image mirrored (``data.crops.flip`` > 0); without, a stream that flips is refused.
        store: latents kept on disk between runs (``data.latent_cache``, data/latent_store.py), read where present.
    """
    if mode not in ("latents", "all"):
        raise CacheError(f"build_cache encodes for model.perf.cache=latents or all, got {mode!r}")
    with borrowed(encoders.park if offload else (), torch.device("cpu")):
        return _build(encoders, instance, prior, resolution, mode, offload, buckets, empty_prompt, mirrored, store)


def _build(encoders: Encoders, instance: ImageSet, prior: ImageSet | None, resolution: int, mode: CacheMode,
           offload: bool, buckets: dict | None, empty_prompt: bool = False, mirrored: bool = True,
           store: LatentStore | None = None) -> InputCache:
    text = {}
    if mode == "all":
        sets = [s for s in (instance, prior) if s]
        prompts = [s.prompt_for(i) for s in sets for i in range(len(s.paths))] + ([""] if empty_prompt else [])
        text = encode_texts(encoders.text_encoders, encoders.tokenizers, prompts)
        if offload:
            to_cpu(*encoders.text_encoders)
    if buckets:
        sizes = [[tuple(buckets[p])] for p in instance.paths]
        prior_sizes = sorted({tuple(b) for b in buckets.values()})
    else:
        sizes, prior_sizes = [[(resolution, resolution)]] * len(instance.paths), [(resolution, resolution)]
    vae = encoders.vae
    one = encoders.one_per_call
    kw = dict(mirrored=mirrored, store=store, images_per_call=encoders.per_call)
    prior_set = encode_set(vae, prior, [prior_sizes] * len(prior.paths), one, **kw) if prior else None
    cache = InputCache(encode_set(vae, instance, sizes, one, **kw), prior_set, resolution, text)
    if offload:
        to_cpu(vae)
    return cache


class CachedExamples:
    """Examples from an :class:`InputCache` instead of pixels: the same flip draw as the pixel streams, latent
    moments at the example's size (and text embeddings), stacked by :meth:`_collate`."""

    cache: InputCache

    @staticmethod
    def _flippable(cache: InputCache, flip_p: float) -> InputCache:
        if flip_p > 0 and not cache.mirrored:
            raise CacheError(f"the input cache holds no mirrored latents, so data.crops.flip={flip_p} cannot be "
                             "trained from it: build it with mirrored=True (the data module does when flip > 0)")
        return cache

    def _example(self, images: ImageSet, i: int, position: int, role: int, size: Size | None = None) -> dict:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, position, role))
        flip = int(torch.rand((), generator=gen) < self.flip_p)  # the draw PairedStream makes
        enc = self.cache.prior if role else self.cache.instance
        e = enc.entries[(i, tuple(size) if size else (self.cache.resolution, self.cache.resolution))]
        ex = {"latent_mean": e.mean[flip], "latent_std": e.std[flip], "original_size": enc.original_size[i],
              "crop_top_left": e.crop_top_left[flip], "prompt": self._prompt(images, i, position, role),
              "is_prior": bool(role), "example_id": example_id(position, role)}
        if self.cache.text:
            ex["prompt_embeds"], ex["pooled_prompt_embeds"] = self.cache.text[ex["prompt"]]
        return ex

    @staticmethod
    def _collate(examples: list[dict]) -> dict:
        out = {k: torch.stack([e[k] for e in examples]) for k in examples[0] if isinstance(examples[0][k], torch.Tensor)}
        out["prompt"] = [e["prompt"] for e in examples]
        out["is_prior"] = torch.tensor([e["is_prior"] for e in examples])
        out["example_id"] = [e["example_id"] for e in examples]
        return out


class CachedStream(CachedExamples, PairedStream):
    """:class:`PairedStream` over an :class:`InputCache`: the same pairing, order, sharding and flip draws,
    yielding latent moments (and text embeddings) instead of pixels.

    Args:
        cache: the encoded image sets.
        batch_size, flip_p, seed, start_batch, rank, world_size, caption_dropout: as for :class:`PairedStream`.
    """

    def __init__(self, cache: InputCache, batch_size: int = 1, flip_p: float = 0.0, seed: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, caption_dropout: float = 0.0):
        super().__init__(cache.instance.images, cache.prior.images if cache.prior else None, cache.resolution,
                         batch_size, True, flip_p, seed, start_batch, rank, world_size,
                         caption_dropout=caption_dropout)
        self.cache = self._flippable(cache, flip_p)


class CachedBucketedStream(CachedExamples, BucketedStream):
    """:class:`~dreambooth_pl.data.buckets.BucketedStream` over an :class:`InputCache` built with ``buckets``: the
    same batches (one bucket each) and flip draws, latent moments at each example's bucket.

    Args:
        cache: the encoded image sets (``build_cache(..., buckets=...)``).
        buckets: instance path -> its bucket.
        batch_size, flip_p, seed, start_batch, rank, world_size, caption_dropout: as for :class:`PairedStream`.
    """

    def __init__(self, cache: InputCache, buckets: dict, batch_size: int = 1, flip_p: float = 0.0, seed: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, caption_dropout: float = 0.0):
        super().__init__(cache.instance.images, cache.prior.images if cache.prior else None, buckets, batch_size,
                         center_crop=True, flip_p=flip_p, seed=seed, start_batch=start_batch, rank=rank,
                         world_size=world_size, caption_dropout=caption_dropout)
        self.cache = self._flippable(cache, flip_p)
