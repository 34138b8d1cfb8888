"""Pixel fidelity and drift metrics: zero for copies, symmetric in their pairing, resizing the photos."""
import numpy as np
import pytest
from PIL import Image

from dreambooth_pl.metrics.pixel import drift_scores, nearest_pixel_distance, paired_pixel_distance


def _img(value, size=8):
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def test_nearest_distance_picks_the_closest_photo_at_the_images_size():
    real = [_img(0, 16), _img(255, 16)]
    assert nearest_pixel_distance([_img(255), _img(0)], real) == 0
    assert nearest_pixel_distance([_img(51)], real) == pytest.approx(51 / 255)
    with pytest.raises(ValueError, match="at least one"):
        nearest_pixel_distance([], real)


def test_paired_distance_and_drift(dino):
    a, b = [_img(10), _img(200)], [_img(10), _img(100)]
    assert paired_pixel_distance(a, b) == pytest.approx(100 / 255 / 2)
    assert paired_pixel_distance(a, a) == 0
    with pytest.raises(ValueError, match="one length"):
        paired_pixel_distance(a, b[:1])
    same = drift_scores(a, a, dino)
    assert same["drift_pixel"] == 0 and same["drift_dino"] == pytest.approx(0, abs=1e-6)
    assert drift_scores(a, b, dino)["drift_dino"] > 0
