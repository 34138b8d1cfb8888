"""Images to latent moments for the input cache (data/cache.py): each image centre-cropped at its sizes, plain and
(where training flips) mirrored, encoded by the VAE a few images at a time while worker threads decode the next ones
(on a GPU with room, copied up asynchronously, so the host queues the next encode before the last ends), and read
from or kept in the on-disk latent store (data/latent_store.py) where one is given.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from .datasets import ImageSet
from .images import decode_rgb, quiet_bombs
from .latent_store import LatentStore
from .transforms import prepare_image

Size = tuple[int, int]  # (height, width) in pixels: the square resolution, or an aspect bucket (data/buckets.py)


@dataclass
class Encoded:
    """One image's latent moments at one size: ``mean``/``std`` ``[k, 4, h/8, w/8]`` (index 1 = mirrored, present
    when the cache was built for flips: ``k`` 2, else 1)."""

    mean: torch.Tensor
    std: torch.Tensor
    crop_top_left: torch.Tensor  # [k, 2] (plain, mirrored)


@dataclass
class EncodedSet:
    """Latent moments of one image set at every size it trains at: ``entries[(index, size)]``."""

    images: ImageSet
    original_size: torch.Tensor  # [N, 2]
    entries: dict[tuple[int, Size], Encoded]


PREFETCH = 4  # images decoded and cropped ahead of the VAE, each on its own thread (PIL and torch release the GIL)


Prepared = list[tuple[Size, torch.Tensor, torch.Tensor]]  # per size: (size, pixels [k, 3, h, w], crops [k, 2])


def _prepared(path, sizes: list[Size], mirrored: bool = True, pin: bool = False) -> tuple[tuple[int, int], Prepared]:
    """One image's ``(height, width)`` and, at each size, its plain (and mirrored) pixels ``[k, 3, h, w]`` (in
    page-locked memory with ``pin``, for an asynchronous copy to the GPU) and crops."""
    img, gen = decode_rgb(path), torch.Generator()  # centre crops: the generator draws nothing
    out = []
    for size in sizes:
        ex = [prepare_image(img, size[0] if size[0] == size[1] else size, True, flip, gen)
              for flip in ((False, True) if mirrored else (False,))]
        pixels = torch.stack([e["pixel_values"] for e in ex])
        out.append((tuple(size), pixels.pin_memory() if pin else pixels,
                    torch.tensor([e["crop_top_left"] for e in ex])))
    return img.size[::-1], out


def ahead(fn, items: list, depth: int = PREFETCH) -> Iterator:
    """``fn(item)`` for each item, in order, computed up to ``depth`` items ahead on worker threads: the image
    decoding overlaps the VAE (a 202-image prior cache decoded ~50 ms per PNG on the host between the GPU's
    encodes). An item's exception is raised where its result would have been yielded; ``depth`` 0: one by one,
    on the calling thread."""
    if depth < 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="cache-decode") as pool:
        pending = deque(pool.submit(fn, item) for item in items[:depth])
        for k in range(len(items)):
            done = pending.popleft()
            if k + depth < len(items):
                pending.append(pool.submit(fn, items[k + depth]))
            try:
                yield done.result()
            except BaseException:  # a failed image, or the consumer stopped: decode nothing more
                for f in pending:
                    f.cancel()
                raise


@torch.no_grad()
def encode_set(vae: torch.nn.Module, images: ImageSet, sizes: list[list[Size]], one_per_call: bool = False,
               prefetch: int = PREFETCH, mirrored: bool = True, store: LatentStore | None = None,
               images_per_call: int = 1) -> EncodedSet:
    """Encode image i of ``images`` centre-cropped at each size of ``sizes[i]``, plain (and mirrored) together,
    ``images_per_call`` images of one size per VAE call (its activations at 1024² are gigabytes per image), the next
    images decoded meanwhile (:func:`ahead`); images ``store`` holds are read from it instead, the others kept there.

    Args:
        vae, images, sizes: the encoder, the images and each image's sizes.
        one_per_call: plain and mirrored in two VAE calls: half the activations (the pair at 1024² held 6.0 of the
            8gb preset's 6.4 GiB allocation peak on an H100), the same latents up to kernel rounding.
        prefetch: images decoded ahead on worker threads (0: one by one, as before 2026-12-06's session 3).
        mirrored: also encode each image mirrored (training flips some examples); without flips half the encodes.
        store: latents kept on disk between runs (data/latent_store.py; None: encode every image).
        images_per_call: images of one size per VAE call (a fit on a GPU with room encodes four: bf16 at 1024²
            0.034 against 0.052 s/image on an H100, BENCHMARKS.md 2026-12-06 session 6). A batch rounds unlike a
            single image, so the store must be keyed for the same count (``latent_key``).
    """
    if images_per_call < 1:
        raise ValueError(f"encode_set: images_per_call is at least 1, got {images_per_call}")
    if store is not None and store.images_per_call != images_per_call:
        raise ValueError(f"encode_set: the latent store is keyed for {store.images_per_call} image(s) per VAE call; "
                         f"images_per_call {images_per_call} would mix other roundings into it")
    originals, entries, ids, work = {}, {}, {}, []
    if store is not None:  # every image's bytes hashed on worker threads (hashlib releases the GIL)
        with ThreadPoolExecutor(max_workers=max(prefetch, 1), thread_name_prefix="cache-hash") as pool:
            ids = dict(enumerate(pool.map(store.content_id, images.paths)))
    for i, path in enumerate(images.paths):
        got = None
        if store is not None:
            got = store.lookup(ids[i], [tuple(size) for size in sizes[i]], mirrored)
        if got is None:
            work.append(i)
            continue
        originals[i], found = got
        entries.update({(i, size): Encoded(*moments) for size, moments in found.items()})
    device = next(vae.parameters()).device
    # on a GPU with room the pixels go up pinned and asynchronously and the moments come back the same way: the
    # host never waits for an encode, so the GPU does not idle between images (the bf16 cache's 202 images took
    # 0.059 s/image on an H100 with a blocking copy back after each). Short of memory (``one_per_call``), each
    # image's moments come back at once, as before.
    overlap = device.type == "cuda" and not one_per_call
    queued, pending = [], []  # (encoded moments, their copy's event) to settle; images waiting to fill a VAE call

    def encode(units: list) -> None:  # units: (i, size, original, pixels [k, 3, h, w], crops), one size
        # each unit copied up on its own (a host-side cat would not be pinned); the dtype cast after the copy, on
        # the device: the same rounding as the host's (to nearest even)
        up = [u[3].to(device, non_blocking=overlap) for u in units]
        pixels = (up[0] if len(up) == 1 else torch.cat(up)).to(vae.dtype)
        with torch.autocast(device.type, enabled=False):  # plain and mirrored in one call, unless short
            dists = [vae.encode(x).latent_dist for x in (pixels.split(1) if one_per_call else (pixels,))]
        mean, std = (torch.cat([getattr(d, k).float() for d in dists]) for k in ("mean", "std"))
        done = None
        if overlap:  # copied back in the stream's order into pinned memory, read once the copy has landed
            mean, std = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in (mean, std))
            done = torch.cuda.Event()
            done.record()
        k = units[0][3].shape[0]
        for j, (i, size, original, _, crops) in enumerate(units):
            item = (i, size, original, mean[j * k:(j + 1) * k], std[j * k:(j + 1) * k], crops)
            queued.append((item, done))
        # every image whose copy has landed is kept now (an interrupted cache keeps what it encoded); the host
        # never waits for the GPU here
        while queued and (queued[0][1] is None or queued[0][1].query()):
            _settle(queued.pop(0)[0], entries, store, ids)

    with quiet_bombs():  # once, here: the worker threads decode under it (images.quiet_bombs)
        prepared_ahead = ahead(lambda i: _prepared(images.paths[i], sizes[i], mirrored, pin=overlap), work,
                               max(prefetch, images_per_call) if prefetch else 0)
        for i, (original, prepared) in zip(work, prepared_ahead):
            for size, pixels, crops in prepared:
                if pending and pending[0][1] != size:
                    encode(pending)
                    pending = []
                pending.append((i, size, original, pixels, crops))
                if len(pending) == images_per_call:
                    encode(pending)
                    pending = []
            originals[i] = original
        if pending:
            encode(pending)
    for item, done in queued:  # the copies still in flight (on a GPU)
        done.synchronize()
        _settle(item, entries, store, ids)
    if store is not None:
        store.flush()  # the entries are on disk (or one warning said why not) before the cache is used
    return EncodedSet(images, torch.tensor([originals[i] for i in range(len(images.paths))]), entries)


def _settle(item: tuple, entries: dict, store: LatentStore | None, ids: dict) -> None:
    """One encoded image's moments on the host (copied there if they are not) into ``entries`` (and ``store``)."""
    i, size, original, mean, std, crops = item
    # contiguous: an NHWC VAE's moments come out channels_last, and the noise drawn like them (randn_like) would
    # then differ from a store entry's, which is read back NCHW
    e = entries[(i, size)] = Encoded(mean.cpu().contiguous(), std.cpu().contiguous(), crops)
    if store is not None:
        store.save(ids[i], original, size, e.mean, e.std, e.crop_top_left)
