"""Aspect-ratio buckets (NovelAI 2022; kohya sd-scripts' ``make_bucket_resolutions``): every image trains at the
bucket of about ``resolution²`` pixels whose aspect ratio is nearest its own, instead of a square crop.

Buckets are ``(height, width)`` pairs, multiples of ``step`` (64: SDXL's latent grid divides by 8, its UNet by 8
again), with area at most ``resolution²`` (and at least ~80% of it) and aspect ratio at most ``max_ratio``. A batch draws from one bucket;
each instance example's class-prior partner is scaled to cover the same bucket and cropped to it (the pair shares
a bucket), so prior pairing stays one instance + one class per example.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from .bounds import check_bounds
from ..noise import mix_seed
from .datasets import ImageSet, PairedStream
from .images import find_instance_images, load_rgb

Bucket = tuple[int, int]  # (height, width) in pixels


def bucket_table(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of area <= ``resolution²``, sides multiples of ``step``, aspect <= ``max_ratio``, by aspect w/h.

    Args:
        resolution: side of the square of equal area (``data.resolution``).
        step: side granularity in pixels.
        max_ratio: largest long/short side ratio.
    """
    if resolution < step or step <= 0 or step % 8:
        raise ValueError(f"data.crops.bucket_step must be a positive multiple of 8 no larger than data.resolution, "
                         f"got {step} (resolution {resolution})")
    # the loop below enumerates widths up to resolution * max_ratio: absurd values are refused first
    check_bounds({"resolution": resolution, "crops.bucket_step": step, "crops.bucket_max_ratio": max_ratio})
    area, table = resolution * resolution, set()
    for w in range(step, int(resolution * max_ratio) + 1, step):
        top = area // w // step * step
        # kohya's table keeps only the tallest h per w, which leaves aspect gaps where an image loses more than a
        # step to the crop (e.g. 1.54 between 832x1216 and 768x1344): one step lower fills them
        for h in (top, top - step):
            for hw in ((h, w), (w, h)):  # both orientations, so portrait and landscape match alike
                if h >= step and max(hw) / min(hw) <= max_ratio:
                    table.add(hw)
    return sorted(table, key=lambda b: b[1] / b[0])


def assign(size: tuple[int, int], table: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio) an image of ``size`` = (height, width)."""
    ratio = math.log(size[1] / size[0])
    return min(table, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def describe(table: list[Bucket], counts: Counter | None, used_only: bool = False) -> str:
    """One line per bucket: ``HxW (aspect): n image(s)`` (just ``HxW (aspect)`` without ``counts``).

    Args:
        table: the buckets.
        counts: photos per bucket (None: the table alone).
        used_only: list only buckets that hold photos, and count the others in one closing line (what fit logs).
    """
    rows = [b for b in table if counts is None or not used_only or counts.get(b)]
    text = "\n".join(f"  {h}x{w} ({w / h:.2f})" + (f": {counts.get((h, w), 0)} image(s)" if counts is not None else "")
                     for h, w in rows)
    unused = len(table) - len(rows)
    return text + (f"\n  ({unused} other bucket(s) hold no photo)" if unused else "")


def bucket_photos(paths, resolution: int, step: int = 64, max_ratio: float = 2.0,
                  used_only: bool = False) -> tuple[dict[Path, Bucket], str]:
    """Each photo's bucket, and the table with each bucket's photo count: what fit logs and ``buckets`` prints.

    Args:
        paths: the instance photos.
        resolution, step, max_ratio: as for :func:`bucket_table`.
        used_only: the table lists only the buckets in use (fit's log; ``buckets`` shows them all).
    """
    table = bucket_table(resolution, step, max_ratio)
    buckets = {p: assign(load_rgb(p).size[::-1], table) for p in paths}
    return buckets, table_header(resolution) + describe(table, Counter(buckets.values()), used_only)


def table_header(resolution: int) -> str:
    """The first line of the bucket table as fit logs it."""
    return f"aspect buckets (height x width, ~{resolution}² pixels):\n"


def bucket_report(data: dict, count: bool = True) -> str:
    """The bucket table a fit config's ``data`` section trains with, as fit logs it: with each bucket's count of
    ``data.photos.dir``'s photos (read and checked as fit reads them) when ``count`` and the folder is set, and
    a note first when ``data.crops.aspect_buckets`` is off.

    Args:
        data: the ``data`` section as a plain dict (resolution, crops, photos, strict_images, ...).
        count: read the photos to count them (False: the table alone).
    """
    crops, photos = data.get("crops") or {}, data.get("photos") or {}
    res, step, ratio = data["resolution"], crops.get("bucket_step", 64), crops.get("bucket_max_ratio", 2.0)
    note = "" if crops.get("aspect_buckets") else (
        f"data.crops.aspect_buckets is off in this config: fit trains square {res}x{res} crops. With "
        "data.crops.aspect_buckets: true it would use:\n")
    if not (count and photos.get("dir")):  # a config without the subject: the table alone
        return note + table_header(res) + describe(bucket_table(res, step, ratio), None)
    photos = find_instance_images(photos["dir"], photos.get("num_images"), res, data.get("strict_images", True))
    return note + bucket_photos(photos, res, step, ratio)[1]


class BucketedStream(PairedStream):
    """:class:`PairedStream` in aspect buckets: each batch holds instance examples of one bucket.

    Epoch ``e`` takes the same seeded permutation of positions as :class:`PairedStream`, groups its positions by
    their instance image's bucket (in permutation order), cuts each group into batches of ``batch_size`` (a short
    last batch is filled from the start of its group), and shuffles the batches with a seed of ``e``. The number
    of batches per epoch is fixed, so batch ``b`` of a resumed run is the batch ``b`` of an uninterrupted one.

    Args:
        buckets: instance path -> its bucket (see :func:`assign`).
        instance, prior, batch_size, center_crop, flip_p, seed, start_batch, rank, world_size, **kwargs: as for
            :class:`PairedStream` (``resolution`` is unused: each batch has its bucket's size).
    """

    def __init__(self, instance: ImageSet, prior: ImageSet | None, buckets: dict[Path, Bucket], batch_size: int = 1,
                 **kwargs):
        super().__init__(instance, prior, max(max(b) for b in buckets.values()), batch_size, **kwargs)
        self.buckets = [buckets[p] for p in instance.paths]
        groups = Counter(self.buckets[k % len(instance.paths)] for k in range(self.epoch_len))
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in groups.values())

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_cached", (None,))[0] == epoch:
            return self._cached[1]
        groups: dict[Bucket, list[int]] = {}
        for k in self._permutation(epoch).tolist():
            groups.setdefault(self.buckets[k % len(self.instance.paths)], []).append(k)
        batches = []
        for ks in groups.values():
            for start in range(0, len(ks), self.batch_size):
                batches.append([ks[(start + i) % len(ks)] for i in range(self.batch_size)])
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1)))
        self._cached = (epoch, [batches[i] for i in order.tolist()])
        return self._cached[1]

    def batch(self, b: int) -> dict:
        """Per-rank batch ``b``: instance examples of one bucket first, then their prior partners in it."""
        g = b * self.world_size + self.rank
        epoch, j = divmod(g, self.batches_per_epoch)
        inst, prior = [], []
        for slot, k in enumerate(self._epoch_batches(epoch)[j]):
            i = k % len(self.instance.paths)
            position = g * self.batch_size + slot  # seeds this example's augmentation, as in PairedStream
            size = self.buckets[i]
            inst.append(self._example(self.instance, i, position, 0, size))
            if self.prior is not None:
                prior.append(self._example(self.prior, k % len(self.prior.paths), position, 1, size))
        return self._collate(inst + prior)
