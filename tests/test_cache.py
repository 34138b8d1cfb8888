"""data/cache.py: same stream as PairedStream, same loss as the pixel path."""
from __future__ import annotations

import pytest
import torch

from dreambooth_pl.data.cache import CacheError, CachedStream, Encoders, build_cache
from dreambooth_pl.data.datamodule import DreamBoothDataModule
from dreambooth_pl.data.settings import CropSettings, PhotoSettings, PriorSettings
from dreambooth_pl.data.datasets import PairedStream
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.settings import LoraSettings, PerfSettings


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    from conftest import make_subject_dirs

    root = tmp_path_factory.mktemp("cache")
    make_subject_dirs(root, 3)
    dm = DreamBoothDataModule(PhotoSettings(str(root / "instance"), "a photo of sks dog"),
                              PriorSettings(True, str(root / "class"), "a photo of dog", 3),
                              CropSettings(center=True, flip=0.5), resolution=32, seed=3)
    dm.setup("fit")
    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False), perf=PerfSettings(cache="all"))
    module.configure_model()
    dm.cache_inputs(Encoders(module.vae, (module.text_encoder, module.text_encoder_2), module.tokenizers), "all",
                    offload=False)
    return dm, module, dm.cache


def test_cached_stream_matches_paired_stream(setup):
    dm, module, cache = setup
    pixels = PairedStream(dm.instance, dm.prior, 32, 2, True, 0.5, 3, rank=1, world_size=2)
    cached = CachedStream(cache, 2, 0.5, 3, rank=1, world_size=2)
    flips_seen = set()
    for b in range(3):
        p, c = pixels.batch(b), cached.batch(b)
        assert p["prompt"] == c["prompt"] and torch.equal(p["is_prior"], c["is_prior"])
        assert torch.equal(p["crop_top_left"], c["crop_top_left"])  # centre crop, mirrored with the flip
        assert c["latent_mean"].shape == (4, 4, 4, 4) and c["prompt_embeds"].shape[:2] == (4, 77)
        plain_left = cache.instance.entries[(0, (32, 32))].crop_top_left[0, 1]
        flips_seen |= {bool(x) for x in (c["crop_top_left"][:, 1] != plain_left)}
    assert flips_seen == {False, True}  # both stored orientations are used


def test_cache_moved_to_a_device_yields_the_same_batches_there(setup):
    """On a GPU the cache moves there (DEVICE_CACHE_BYTES), so batches are stacked on the device: ``meta`` stands
    in for it on the CPU; every tensor must move, and the stream must yield the same shapes from it."""
    dm, module, cache = setup
    moved = cache.to(torch.device("meta"))
    assert moved.device.type == "meta" and cache.device.type == "cpu" and moved.nbytes() == cache.nbytes()
    assert len(moved.tensors()) == len(cache.tensors()) and all(t.is_meta for t in moved.tensors())
    here, there = CachedStream(cache, 2, 0.5, 3).batch(1), CachedStream(moved, 2, 0.5, 3).batch(1)
    assert here["prompt"] == there["prompt"] and torch.equal(here["is_prior"], there["is_prior"])
    for k in ("latent_mean", "latent_std", "original_size", "crop_top_left", "prompt_embeds"):
        assert there[k].is_meta and there[k].shape == here[k].shape, k
    per_image = 2 * 2 * 4 * 4 * 4 * 4  # mean and std, plain and mirrored, [4, 4, 4] fp32 latents at 32 px
    assert cache.nbytes() > 5 * per_image  # 2 instance + 3 class images, plus crops, sizes and text embeddings


def test_cache_inputs_keeps_its_first_result(setup):
    """A second hand-over (a second fit on the same data module) reuses the cache instead of re-encoding."""
    dm, module, cache = setup
    dm.cache_inputs(Encoders(module.vae, (module.text_encoder, module.text_encoder_2), module.tokenizers), "latents",
                    offload=False)
    assert dm.cache is cache and set(cache.text) == {"a photo of sks dog", "a photo of dog"}
    with pytest.raises(CacheError, match="latents or all, got 'off'"):
        build_cache(Encoders(module.vae, (), ()), dm.instance, None, 32, "off")


def test_cached_loss_equals_pixel_loss(setup):
    dm, module, cache = setup
    pixels = PairedStream(dm.instance, dm.prior, 32, 1, True, 0.0, 3).batch(0)
    cached = CachedStream(cache, 1, 0.0, 3).batch(0)
    with torch.no_grad():
        ref = module.forward_loss(pixels)
        got = module.forward_loss(cached)  # latent sampled from the stored distribution with the same draws
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_fit_with_cache_frees_encoders(tiny_base, subject_dirs, tmp_path):
    from dreambooth_pl.cli import DreamBoothCLI
    from conftest import fit_args

    inst, cls = subject_dirs
    cli = DreamBoothCLI(args=fit_args(tiny_base, inst, cls, str(tmp_path), steps=2, **{"model.perf.cache": "all"}))
    assert cli.trainer.global_step == 2 and cli.datamodule.cache is not None
    assert set(cli.datamodule.cache.text) == {"a photo of sks dog", "a photo of dog"}
    assert cli.model.vae.device.type == "cpu" and cli.model.text_encoder_2.device.type == "cpu"
    assert not cli.datamodule.cache.mirrored  # data.crops.flip is 0: the mirrored latents are not encoded


def test_fit_with_caption_dropout_trains_on_the_seeded_empty_prompts(tiny_base, subject_dirs, tmp_path):
    """A seeded 8-step fit (cache all, prior preservation, one photo of each held out): the batches training_step
    receives hold exactly the empty prompts that ``dropped_caption`` names for the positions consumed, encoded in the
    cache beside the rest; the held-out loss is logged."""
    import lightning as L

    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.data.datasets import dropped_caption

    class Prompts(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(list(batch["prompt"]))

    inst, cls = subject_dirs
    cli = DreamBoothCLI(args=fit_args(tiny_base, inst, cls, str(tmp_path), steps=8, **{
        "model.perf.cache": "all", "data.caption_dropout": 0.5, "seed_everything": 2,
        "data.photos.held_out": 1, "trainer.val_check_interval": 4})[1:], run=False)
    recorder = Prompts()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert set(cli.datamodule.cache.text) == {"a photo of sks dog", "a photo of dog", ""}
    empty = [[p == "" for p in batch] for batch in recorder.seen]
    assert empty == [[dropped_caption(2, b, role, 0.5) for role in (0, 1)] for b in range(8)]
    assert sum(map(sum, empty)) == 11  # the seeded run's count of its 16 examples
    # the held-out loss with the encoders moved off by the cache: the cached prompt embeddings, latents where the VAE is
    assert cli.model.vae.device.type == "cpu" and torch.isfinite(cli.trainer.logged_metrics["val/loss"])
    assert len(cli.datamodule.instance.paths) == 1 and len(cli.datamodule.held_out) == 2


def test_one_image_per_vae_call_gives_the_pairs_latents(setup):
    """``Encoders.one_per_call`` (a GPU short of memory): plain and mirrored go through the VAE one at a time,
    halving its activations, and their latents equal the pair's up to the kernels' batch rounding (1e-5 relative)."""
    from dreambooth_pl.data.encode import encode_set

    dm, module, cache = setup
    batches = []
    encode = module.vae.encode
    module.vae.encode = lambda x: (batches.append(x.shape[0]), encode(x))[1]
    try:
        one = encode_set(module.vae, dm.instance, [[(32, 32)]] * len(dm.instance.paths), one_per_call=True)
    finally:
        del module.vae.encode
    assert batches == [1, 1] * len(dm.instance.paths)
    for key, pair in cache.instance.entries.items():
        got = one.entries[key]
        assert got.mean.shape == pair.mean.shape == (2, 4, 4, 4)
        assert torch.allclose(got.mean, pair.mean, rtol=1e-5, atol=1e-6 * pair.mean.abs().max().item())
        assert torch.allclose(got.std, pair.std, rtol=1e-5, atol=1e-6 * pair.std.abs().max().item())
        assert torch.equal(got.crop_top_left, pair.crop_top_left)


def test_images_are_decoded_ahead_in_order_and_a_bad_one_is_named(setup, tmp_path):
    """The cache decodes the next images on worker threads while the VAE encodes (``ahead``): results keep the
    images' order, ``depth`` items really run at once (a barrier of 3 only opens if 3 run together), and an image
    that cannot be read stops the cache with its path, as the one-by-one loop did."""
    import threading

    from dreambooth_pl.data.encode import ahead, encode_set
    from dreambooth_pl.data.datasets import ImageSet
    from dreambooth_pl.data.images import ImageIntakeError

    barrier = threading.Barrier(3, timeout=30)

    def together(i):
        if i < 3:
            barrier.wait()  # BrokenBarrierError after 30 s if the first three do not run at the same time
        return i * i

    assert list(ahead(together, list(range(8)), depth=3)) == [i * i for i in range(8)]
    assert list(ahead(lambda i: i + 1, [4, 5], depth=0)) == [5, 6]  # inline
    dm, module, cache = setup
    again = encode_set(module.vae, dm.instance, [[(32, 32)]] * len(dm.instance.paths))
    for key, e in cache.instance.entries.items():  # the same images at the same indices as the cache's
        assert torch.allclose(again.entries[key].mean, e.mean, rtol=1e-5, atol=1e-6 * e.mean.abs().max().item())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = (dm.instance.paths[0], bad, *dm.instance.paths[1:])
    with pytest.raises(ImageIntakeError, match="broken.png"):
        encode_set(module.vae, ImageSet(paths, "a photo of sks dog"), [[(32, 32)]] * len(paths))


def test_without_flips_only_the_plain_latents_are_encoded(setup):
    """``data.crops.flip: 0`` (the recipe): the mirrored half of the cache would never be read, so it is not encoded
    (half the VAE's encodes); the plain latents are the flipping cache's, and a stream that flips is refused."""
    dm, module, cache = setup
    plain = build_cache(Encoders(module.vae, (), ()), dm.instance, dm.prior, 32, "latents", offload=False,
                        mirrored=False)
    assert cache.mirrored and not plain.mirrored and plain.nbytes() < cache.nbytes()
    for key, e in cache.prior.entries.items():
        got = plain.prior.entries[key]
        assert got.mean.shape == (1, 4, 4, 4) and torch.equal(got.crop_top_left, e.crop_top_left[:1])
        assert torch.allclose(got.mean, e.mean[:1], rtol=1e-5, atol=1e-6 * e.mean.abs().max().item())
    batch = CachedStream(plain, 2, 0.0, 3).batch(0)
    assert batch["latent_mean"].shape == (4, 4, 4, 4)
    with pytest.raises(CacheError, match=r"no mirrored latents, so data.crops.flip=0.5"):
        CachedStream(plain, 2, 0.5, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_encodes_queued_without_syncs_equal_one_image_at_a_time(tiny_base, subject_dirs, tmp_path):
    """On a GPU with room the cache copies pinned pixels up and the moments back asynchronously; the latents are
    the ones a synchronous encode of each image gives (the same kernels, so bit equal), they reach the host for
    every image, and a latent store written that way reads back the same; four images per call give each image's
    latents within the batch's bf16 rounding."""
    from dreambooth_pl.data.datasets import ImageSet
    from dreambooth_pl.data.encode import _prepared, encode_set
    from dreambooth_pl.data.images import list_images
    from dreambooth_pl.data.latent_store import open_store
    from dreambooth_pl.sdxl import load_vae

    vae = load_vae(tiny_base, torch.bfloat16).to("cuda")
    paths = tuple(list_images(subject_dirs[0], "instance")) + tuple(list_images(subject_dirs[1], "class"))
    images, sizes = ImageSet(paths, "p"), [[(64, 64)]] * len(paths)
    assert _prepared(paths[0], [(64, 64)], pin=True)[1][0][1].is_pinned()  # what makes the copy asynchronous
    store = open_store(str(tmp_path / "latents"), tiny_base + "/vae", vae, False)
    got = encode_set(vae, images, sizes, mirrored=True, store=store)
    again = encode_set(vae, images, sizes, mirrored=True, store=store)
    assert store.misses == len(paths) and store.hits == len(paths)  # written by the first, read by the second
    for i, path in enumerate(paths):
        _, [(size, pixels, _)] = _prepared(path, [(64, 64)])
        with torch.no_grad():
            dist = vae.encode(pixels.to("cuda").to(vae.dtype)).latent_dist
        e = got.entries[(i, (64, 64))]
        assert e.mean.device.type == "cpu" and torch.equal(e.mean, dist.mean.float().cpu())
        assert torch.equal(e.std, dist.std.float().cpu())
        assert torch.equal(again.entries[(i, (64, 64))].mean, e.mean)
    # four images per call, as a fit with room encodes: each image's slice of the batch's pinned copy, within the
    # batch's rounding of the one-image latents, into a store of its own count
    four_store = open_store(str(tmp_path / "latents"), tiny_base + "/vae", vae, False, images_per_call=4)
    four = encode_set(vae, images, sizes, mirrored=True, store=four_store, images_per_call=4)
    assert four_store.folder != store.folder and four_store.misses == len(paths)
    for key, e in got.entries.items():
        rel = float((four.entries[key].mean - e.mean).norm() / e.mean.norm())
        assert four.entries[key].mean.shape == e.mean.shape and rel < 1e-2, (key, rel)


def test_several_images_per_vae_call_give_one_images_latents(setup, tmp_path):
    """``encode_set(images_per_call=n)`` (what the cache-ab benchmark times): images of one size share a VAE call,
    a size change starts a new call, and every image's latents equal the one-image encode up to the kernels' batch
    rounding (1e-5 relative, fp32); a latent store keyed for another count is refused, one keyed for the count
    keeps and returns them (apart from the one-per-call store)."""
    from dreambooth_pl.data.encode import encode_set

    dm, module, _ = setup
    paths = dm.instance.paths + dm.prior.paths
    images = type(dm.instance)(tuple(paths), "p")
    sizes = [[(32, 32)] if i % 3 else [(32, 32), (48, 32)] for i in range(len(paths))]
    calls = []
    encode = module.vae.encode
    module.vae.encode = lambda x: (calls.append(tuple(x.shape[:1] + x.shape[2:])), encode(x))[1]
    try:
        grouped = encode_set(module.vae, images, sizes, images_per_call=3, mirrored=False)
    finally:
        del module.vae.encode
    one = encode_set(module.vae, images, sizes, mirrored=False)
    units = sum(map(len, sizes))
    assert sum(n for n, *_ in calls) == units and max(n for n, *_ in calls) == 3 and len(calls) < units
    assert {(h, w) for _, h, w in calls} == {(32, 32), (48, 32)}
    for key, e in one.entries.items():
        got = grouped.entries[key]
        assert torch.allclose(got.mean, e.mean, rtol=1e-5, atol=1e-6 * e.mean.abs().max().item())
        assert torch.allclose(got.std, e.std, rtol=1e-5, atol=1e-6 * e.std.abs().max().item())
    from dreambooth_pl.data.latent_store import open_store

    vae_folder = tmp_path / "vae"  # the key fingerprints this folder: not the one the store writes into
    vae_folder.mkdir()
    store = open_store(str(tmp_path / "latents"), str(vae_folder), module.vae, False, images_per_call=3)
    with pytest.raises(ValueError, match="keyed for 3 image.s. per VAE call; images_per_call 2"):
        encode_set(module.vae, images, sizes, images_per_call=2, store=store)
    kept = encode_set(module.vae, images, sizes, images_per_call=3, mirrored=False, store=store)
    assert store.misses == len(paths) and all(torch.equal(kept.entries[k].mean, v.mean)
                                              for k, v in grouped.entries.items())
    again = open_store(str(tmp_path / "latents"), str(vae_folder), module.vae, False, images_per_call=3)
    encode_set(module.vae, images, sizes, images_per_call=3, mirrored=False, store=again)
    assert again.hits == len(paths) and again.folder == store.folder
    assert open_store(str(tmp_path / "latents"), str(vae_folder), module.vae, False).folder != store.folder
