"""data/bounds.py: every data setting that sizes a loop or a table is range-checked before any model loads."""
import time

import pytest

from dreambooth_pl.data.bounds import BOUNDS, check_bounds
from dreambooth_pl.data.buckets import bucket_table
from dreambooth_pl.data.datamodule import DreamBoothDataModule
from dreambooth_pl.data.settings import CropSettings, PhotoSettings, PriorSettings

NO_PRIORS = PriorSettings(enabled=False)


def test_a_huge_bucket_ratio_is_refused_at_once(tmp_path):
    """It used to enumerate 2.5e8 bucket widths: fit hung at 100% CPU before printing anything."""
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"data.crops.bucket_max_ratio must be in \[1, 8\], got 1e\+09"):
        DreamBoothDataModule(PhotoSettings(str(tmp_path), "a photo of sks dog"), NO_PRIORS,
                             CropSettings(aspect_buckets=True, bucket_max_ratio=1e9))
    with pytest.raises(ValueError, match="bucket_max_ratio"):
        bucket_table(1024, 64, 1e9)  # the buckets verb and fit --print_config's table
    assert time.monotonic() - start < 10
    assert len(bucket_table(1024, 64, BOUNDS["crops.bucket_max_ratio"][1])) < 200  # the largest table accepted is small


@pytest.mark.parametrize("key, value", [("resolution", 10 ** 6), ("priors.num_images", 10 ** 9),
                                        ("batch_size", 10 ** 5), ("num_workers", 10 ** 4),
                                        ("crops.bucket_step", 10 ** 6), ("photos.num_images", 10 ** 6)])
def test_each_bound_names_its_key(tmp_path, key, value):
    groups = {"photos": {"dir": str(tmp_path), "prompt": "a photo of sks dog"}, "priors": {"enabled": False}}
    group, _, name = key.rpartition(".")
    if group:
        groups[group] = {**groups.get(group, {}), name: value}
    with pytest.raises(ValueError, match=rf"data.{key} must be in \["):
        DreamBoothDataModule(**groups, **({} if group else {key: value}))


def test_class_image_bounds_and_every_key_listed():
    with pytest.raises(ValueError, match=r"data.priors.generation.sampler.steps must be in \[1, 1000\], got 100000; "
                                         r"data.priors.generation.batch_size"):
        check_bounds({"priors.generation.sampler.steps": 10 ** 5, "priors.generation.batch_size": 0})
    check_bounds({k: lo for k, (lo, hi) in BOUNDS.items()})
    check_bounds({k: hi for k, (lo, hi) in BOUNDS.items()})
