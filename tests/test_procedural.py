"""The procedural class: renders, the instance outside the class, and a base that make-procedural teaches."""
import numpy as np
import pytest

from dreambooth_pl.sampling import SamplerSettings
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


def test_prior_preservation_lowers_class_prompt_drift(tiny_base, tmp_path):
    """The direction the procedural ablation measured (docs/ablations.md), in a CI-sized copy: the same instance,
    60 steps with and without the prior term; class-prompt samples drift less from the base's own with it."""
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.metrics.pixel import paired_pixel_distance
    from dreambooth_pl.sampling import generate, load_pipeline
    from dreambooth_pl.tools.generate_class_images import generate_class_images
    from tests.conftest import fit_args

    inst, cls = tmp_path / "instance", tmp_path / "class"
    inst.mkdir()
    for i, img in enumerate(P.instance_images(3)):
        img.save(inst / f"{i}.png")
    generate_class_images(base=tiny_base, prompt="a photo of dog", out=str(cls), num=4,
                          sampler=SamplerSettings(steps=4, guidance=1.0), resolution=32, dtype="float32", device="cpu")
    seeds, prompt = [100, 101, 102, 103], ["a photo of dog"] * 4
    pipe = load_pipeline(tiny_base, dtype="float32", device="cpu")
    base = generate(pipe, prompt, seeds, steps=4, guidance=1.0, height=32, width=32)
    drift = {}
    for prior in (True, False):
        root = tmp_path / f"prior_{prior}"
        DreamBoothCLI(args=fit_args(tiny_base, str(inst), str(cls) if prior else None, str(root), steps=60,
                                    **{"model.lora.init": "gaussian", "model.optim.learning_rate": 1e-2,
                                       "trainer.gradient_clip_val": 1.0, "checkpoint.every_n_train_steps": 60}))
        pipe = load_pipeline(tiny_base, [(str(root / "lightning_logs" / "version_0"), 1.0)], dtype="float32",
                             device="cpu")
        drift[prior] = paired_pixel_distance(generate(pipe, prompt, seeds, steps=4, guidance=1.0, height=32,
                                                      width=32), base)
    assert 0 < drift[True] < drift[False]
