"""Aspect buckets: the table, nearest-aspect assignment that crops less than one bucket step, batches of one
bucket with their prior partners in it, and SDXL's add_time_ids recording the real size and crop."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_pl.data.buckets import BucketedStream, assign, bucket_table
from dreambooth_pl.data.datasets import ImageSet
from dreambooth_pl.data.transforms import prepare_image
from dreambooth_pl.sdxl import add_time_ids
from dreambooth_pl.tools.buckets import buckets
from conftest import write_images


def test_table_has_sdxl_buckets_of_about_resolution_squared():
    table = bucket_table(1024)
    assert (1024, 1024) in table and (832, 1216) in table and (1216, 832) in table and (768, 1344) in table
    for h, w in table:
        assert h % 64 == 0 and w % 64 == 0 and max(h, w) / min(h, w) <= 2.0
        assert 0.8 * 1024**2 <= h * w <= 1024**2  # about resolution², never more
    ratios = [w / h for h, w in table]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    with pytest.raises(ValueError, match="bucket_step"):
        bucket_table(1024, step=60)


def test_each_image_keeps_its_aspect_within_one_bucket_step_and_add_time_ids_records_it():
    table = bucket_table(1024)
    rng = np.random.default_rng(0)
    for _ in range(60):
        h = int(rng.integers(600, 4000))
        w = int(h * np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        bucket = assign((h, w), table)
        ex = prepare_image(Image.new("RGB", (w, h)), bucket, True, False, torch.Generator())
        assert tuple(ex["pixel_values"].shape[-2:]) == bucket
        top, left = ex["crop_top_left"]
        assert 2 * max(top, left) <= 64 + 1, (h, w, bucket, top, left)  # less than one step cropped away
        ids = add_time_ids(torch.tensor([ex["original_size"]]), torch.tensor([ex["crop_top_left"]]),
                           torch.tensor([bucket]))
        assert ids[0].tolist() == [h, w, top, left, *bucket]


def _images(folder, sizes):
    paths = []
    for i, (w, h) in enumerate(sizes):
        paths += write_images(folder, 1, size=(w, h), seed=i)
        paths[-1] = paths[-1].rename(folder / f"{i:02d}.png")
    return paths


def test_batches_draw_from_one_bucket_with_prior_partners_in_it(tmp_path):
    table = bucket_table(128, step=32)
    assert table == [(160, 96), (128, 96), (128, 128), (96, 128), (96, 160)]
    sizes = [(120, 200), (200, 120), (160, 160), (110, 190), (210, 130)]  # (w, h): portrait, landscape, square
    inst = _images(tmp_path / "i", sizes)
    buckets = {p: assign((h, w), table) for p, (w, h) in zip(inst, sizes)}
    prior = ImageSet(tuple(write_images(tmp_path / "c", 3, size=(128, 128), seed=7)), "a dog")
    stream = BucketedStream(ImageSet(tuple(inst), "sks dog"), prior, buckets, batch_size=2, seed=3)
    assert stream.batches_per_epoch == 3  # 160x96, 96x160 and 128x128 hold 2, 2 and 1 of the 5 positions
    seen = Counter()
    for b in range(2 * stream.batches_per_epoch):
        batch = stream.batch(b)
        assert batch["pixel_values"].shape[0] == 4 and batch["is_prior"].tolist() == [False, False, True, True]
        shape = tuple(batch["pixel_values"].shape[-2:])
        assert shape in table and all(tuple(o) for o in batch["original_size"])
        for k in stream._epoch_batches(b // stream.batches_per_epoch)[b % stream.batches_per_epoch]:
            assert buckets[inst[k % len(inst)]] == shape  # every instance in its own bucket
            seen[k % len(inst)] += 1
    assert set(seen) == set(range(len(inst)))
    again = BucketedStream(ImageSet(tuple(inst), "sks dog"), prior, buckets, batch_size=2, seed=3, start_batch=5)
    assert torch.equal(next(iter(again))["pixel_values"], stream.batch(5)["pixel_values"])  # resume: same batch


def test_fit_logs_the_bucket_counts(tiny_base, tmp_path, caplog):
    from conftest import fit_args

    from dreambooth_pl.cli import DreamBoothCLI

    _images(tmp_path / "instance", [(120, 200), (200, 120), (110, 190)])
    write_images(tmp_path / "class", 4, size=(128, 128))
    args = fit_args(tiny_base, str(tmp_path / "instance"), str(tmp_path / "class"), str(tmp_path), steps=2,
                    **{"data.crops.aspect_buckets": "true", "data.resolution": 128, "data.crops.bucket_step": 32})
    with caplog.at_level(logging.INFO):
        cli = DreamBoothCLI(args=args)
    assert "160x96 (0.60): 2 image(s)" in caplog.text and "96x160 (1.67): 1 image(s)" in caplog.text
    assert cli.trainer.global_step == 2
    config = _data_config(tmp_path, aspect_buckets=True,
                          priors={"dir": str(tmp_path / "class"), "prompt": "a photo of dog", "num_images": 4})
    table = buckets([config])  # the verb prints every bucket; fit logs the ones in use and counts the others
    used = [ln for ln in table.splitlines() if not ln.endswith(": 0 image(s)")]
    assert all(ln in caplog.text for ln in used) and "(3 other bucket(s) hold no photo)" in caplog.text
    assert ": 0 image(s)" not in caplog.text


def _data_config(tmp_path, aspect_buckets: bool = False, photos: bool = True, priors=None) -> str:
    """A fit config of the test subject at 128 px in buckets of 32 (``photos=False``: without the subject)."""
    import yaml

    data = {"resolution": 128, "crops": {"bucket_step": 32, "aspect_buckets": aspect_buckets},
            "priors": priors or {"enabled": False}}
    if photos:
        data["photos"] = {"dir": str(tmp_path / "instance"), "prompt": "a photo of sks dog"}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump({"model": {"base_model": "unused"}, "data": data}))
    return str(path)


def test_buckets_verb_shows_the_table_before_training(tmp_path, capsys):
    """``buckets CONFIG``: the table and counts, a note when data.crops.aspect_buckets is off, values to try, and bad
    values or files named."""
    from dreambooth_pl.__main__ import main

    _images(tmp_path / "instance", [(120, 200), (200, 120), (110, 190)])
    main(["buckets", _data_config(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("data.crops.aspect_buckets is off in this config: fit trains square 128x128 crops")
    assert "160x96 (0.60): 2 image(s)\n  128x96 (0.75): 0 image(s)" in out and "96x160 (1.67): 1 image(s)" in out
    tried = buckets([_data_config(tmp_path, aspect_buckets=True)], resolution=256, bucket_step=64)
    assert tried.startswith("aspect buckets (height x width, ~256² pixels):") and "320x192 (0.60): 2 image(s)" in tried
    no_subject = buckets([_data_config(tmp_path, photos=False)])
    assert "  160x96 (0.60)\n" in no_subject and "image(s)" not in no_subject
    with pytest.raises(ValueError, match="data.crops.bucket_step must be a positive multiple of 8"):
        buckets([_data_config(tmp_path)], bucket_step=50)
    with pytest.raises(ValueError, match="not found: .*missing.yaml"):
        buckets([str(tmp_path / "missing.yaml")])


def test_cache_keys_on_the_bucket_and_streams_the_same_batches(tiny_base, tmp_path):
    """model.perf.cache with aspect buckets: each photo encoded at its bucket, each class image at every bucket in use;
    the cached stream yields the pixel stream's batches (same bucket, prompts, flips and crops), and its loss
    equals the pixel path's on centre crops."""
    from dreambooth_pl.data.cache import CachedBucketedStream, Encoders, build_cache
    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import LoraSettings, PerfSettings

    table = bucket_table(128, step=32)
    sizes = [(120, 200), (200, 120), (110, 190)]
    inst = ImageSet(tuple(_images(tmp_path / "i", sizes)), "a photo of sks dog")
    buckets = {p: assign((h, w), table) for p, (w, h) in zip(inst.paths, sizes)}
    prior = ImageSet(tuple(write_images(tmp_path / "c", 3, size=(128, 128), seed=7)), "a photo of dog")
    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False), perf=PerfSettings(cache="all"))
    module.configure_model()
    encoders = Encoders(module.vae, (module.text_encoder, module.text_encoder_2), module.tokenizers)
    cache = build_cache(encoders, inst, prior, 128, "all", offload=False, buckets=buckets)
    assert set(cache.instance.entries) == {(i, buckets[p]) for i, p in enumerate(inst.paths)}
    assert set(cache.prior.entries) == {(c, b) for c in range(3) for b in set(buckets.values())}
    kw = dict(batch_size=2, flip_p=0.5, seed=3)
    pixels = BucketedStream(inst, prior, buckets, center_crop=True, **kw)
    cached = CachedBucketedStream(cache, buckets, **kw)
    for b in range(4):
        p, c = pixels.batch(b), cached.batch(b)
        assert p["prompt"] == c["prompt"] and torch.equal(p["is_prior"], c["is_prior"])
        assert torch.equal(p["crop_top_left"], c["crop_top_left"]) and torch.equal(p["original_size"],
                                                                                  c["original_size"])
        assert tuple(c["latent_mean"].shape[-2:]) == tuple(s // 8 for s in p["pixel_values"].shape[-2:])
        with torch.no_grad():
            ref, got = module.forward_loss(p), module.forward_loss(c)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-4, atol=1e-5)


def test_fit_with_buckets_and_cache(tiny_base, tmp_path):
    from conftest import fit_args

    from dreambooth_pl.cli import DreamBoothCLI

    _images(tmp_path / "instance", [(120, 200), (200, 120), (110, 190)])
    write_images(tmp_path / "class", 4, size=(128, 128))
    cli = DreamBoothCLI(args=fit_args(tiny_base, str(tmp_path / "instance"), str(tmp_path / "class"), str(tmp_path),
                                      steps=2, **{"data.crops.aspect_buckets": "true", "data.resolution": 128,
                                                  "data.crops.bucket_step": 32, "model.perf.cache": "all"}))
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.logged_metrics["train/loss"])
    assert {size for _, size in cli.datamodule.cache.instance.entries} == {(160, 96), (96, 160)}


def test_print_config_and_the_saved_config_end_with_the_bucket_table(tiny_base, tmp_path, capsys):
    """``fit --print_config`` shows the derived table (with photo counts) as YAML comments, so the printed config
    still loads, and reads the same with buckets off (no table)."""
    import yaml

    from dreambooth_pl.cli import DreamBoothCLI

    _images(tmp_path / "instance", [(120, 200), (200, 120), (110, 190)])
    config = _data_config(tmp_path, aspect_buckets=True)
    with pytest.raises(SystemExit):
        DreamBoothCLI(args=["fit", "--config", config, "--print_config"])
    out = capsys.readouterr().out
    table = buckets([config])
    assert out.endswith("".join(f"# {line}\n" for line in table.splitlines()))
    assert "# aspect buckets (height x width, ~128² pixels):" in out and "#   160x96 (0.60): 2 image(s)\n" in out
    assert yaml.safe_load(out)["data"]["crops"]["aspect_buckets"] is True
    with pytest.raises(SystemExit):  # an unreadable folder: the table without counts, and why
        DreamBoothCLI(args=["fit", "--config", config, f"--data.photos.dir={tmp_path / 'gone'}", "--print_config"])
    out = capsys.readouterr().out
    assert "#   160x96 (0.60)\n" in out and "# (photos not counted:" in out
    with pytest.raises(SystemExit):
        DreamBoothCLI(args=["fit", "--config", _data_config(tmp_path), "--print_config"])
    assert "aspect buckets" not in capsys.readouterr().out
