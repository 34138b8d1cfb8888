"""Training transforms against the torchvision pipeline of diffusers' train_dreambooth_lora_sdxl.py."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dreambooth_pl.data.transforms import prepare_image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def test_resize_and_centre_crop_equal_the_reference_lanczos_pipeline(photo):
    """The reference: Resize(res, LANCZOS) -> CenterCrop(res) -> ToTensor -> Normalize([0.5], [0.5])."""
    ref = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.LANCZOS),
                              transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    got = prepare_image(photo, 32, True, False, torch.Generator())
    torch.testing.assert_close(got["pixel_values"], ref(photo), rtol=0, atol=0)
    assert got["original_size"] == (90, 120) and got["crop_top_left"] == (0, 5)
    bilinear = prepare_image(photo, 32, True, False, torch.Generator(),
                             interpolation=transforms.InterpolationMode.BILINEAR)
    assert (bilinear["pixel_values"] - got["pixel_values"]).abs().max() > 0.05  # the filter matters


@pytest.mark.parametrize("size", [(427, 1000), (428, 1000), (1000, 427), (301, 301), (64, 97), (97, 64)])
def test_flip_then_centre_crop_equals_the_reference_over_odd_and_even_margins(size):
    """The script flips, then centre-crops (with the crop offsets of the flipped image): with an odd margin,
    cropping first and flipping after takes a window one pixel over (max abs 0.816 on a 1000x427 photo).
    Equality is exact: the same PIL resize and the same integer crop on the same pixels."""
    h, w = size
    img = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    resize = transforms.Resize(64, interpolation=transforms.InterpolationMode.LANCZOS)
    resized = resize(img)
    ref = transforms.Compose([transforms.RandomHorizontalFlip(p=1.0), transforms.CenterCrop(64),
                              transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(resized)
    got = prepare_image(img, 64, True, True, torch.Generator())
    torch.testing.assert_close(got["pixel_values"], ref, rtol=0, atol=0)
    rw, rh = resized.size  # the script's recorded offsets: those of the centre crop in the flipped image
    assert got["crop_top_left"] == (round((rh - 64) / 2), round((rw - 64) / 2))
