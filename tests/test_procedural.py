"""The procedural class: renders, the instance outside the class, and a base that make-procedural teaches."""
import numpy as np
import pytest

from dreambooth_pl.tools import procedural as P


def test_class_images_are_seeded_and_the_instance_colour_is_in_none_of_them():
    a = [np.asarray(P.class_image(np.random.default_rng(0))) for _ in range(3)]
    b = [np.asarray(P.class_image(np.random.default_rng(0))) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0].shape == (32, 32, 3)
    assert P.INSTANCE["colour"] not in P.COLOURS.values()
    photos = P.instance_images(5)
    assert len({np.asarray(p).tobytes() for p in photos}) == 5  # varied positions and backgrounds
    magenta = [(np.abs(np.asarray(p, dtype=int) - P.INSTANCE["colour"]).sum(-1) < 40).mean() for p in photos]
    assert min(magenta) > 0.05
    with pytest.raises(ValueError, match="unknown shape kind"):
        P.render("star", (0, 0, 0), (255, 255, 255), 0.5, 0.5, 0.3)


def test_make_procedural_writes_a_loadable_base_with_a_unit_variance_scaling(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    msg = P.make_procedural(str(tmp_path / "p"), vae_steps=2, unet_steps=1, batch=4)
    assert "VAE reconstruction MSE" in msg
    assert len(list((tmp_path / "p" / "instance").glob("*.png"))) == 5
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "p" / "base"), subfolder="vae")
    x = P._batch(np.random.default_rng(5), 32, 32)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert z.std().item() == pytest.approx(1.0, rel=0.2)  # SDXL's convention, re-derived for the taught VAE
    assert "exists" in P.make_procedural(str(tmp_path / "p"))  # a second call reuses the base
