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
