"""A base that knows one class, so DreamBooth's effect can be measured on a CPU: procedural coloured shapes.

The random tiny base cannot show subject fidelity: its "a photo of shape" means nothing. ``make-procedural`` first
teaches it a class: its VAE learns to reconstruct 32 px renders of shapes in any colour (a general-purpose
autoencoder, as SDXL's is), then its UNet learns to generate the class (circle, square, triangle, diamond in six
colours on varied backgrounds) for the caption "a photo of shape". It also renders the instance: one specific
shape outside that distribution (a magenta triangle with a white dot) in a few positions, sizes and backgrounds. ``configs/ablations/procedural.yaml`` then DreamBooths that
instance into the base with and without prior preservation (Ruiz et al. 2023, eq. 2) and measures fidelity and
language drift (docs/ablations.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
           "cyan": (40, 200, 210), "orange": (240, 140, 30)}
BACKGROUNDS = ((245, 245, 245), (30, 30, 30), (120, 120, 120), (200, 180, 150), (20, 40, 80), (150, 200, 150))
INSTANCE = dict(kind="triangle", colour=(230, 0, 200), dot=(255, 255, 255))  # magenta: in no class image
CLASS_PROMPT = "a photo of shape"


def render(kind: str, colour: tuple, background: tuple, cx: float, cy: float, r: float, size: int = 32,
           dot: tuple | None = None) -> Image.Image:
    """One shape on a plain background, drawn at 4x and downsampled with LANCZOS (antialiased edges).

    Args:
        kind: one of :data:`KINDS`.
        colour, background: RGB fill of the shape and of the background.
        cx, cy, r: centre and radius as fractions of the side.
        size: output side in pixels.
        dot: RGB of a centre dot of radius r/3 (None: none).
    """
    s = size * 4
    img = Image.new("RGB", (s, s), background)
    d = ImageDraw.Draw(img)
    x, y, rr = cx * s, cy * s, r * s
    if kind == "circle":
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=colour)
    elif kind == "square":
        d.rectangle([x - rr * 0.8, y - rr * 0.8, x + rr * 0.8, y + rr * 0.8], fill=colour)
    elif kind == "triangle":
        d.polygon([(x + rr * math.cos(a), y + rr * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
                  fill=colour)
    elif kind == "diamond":
        d.polygon([(x, y - rr), (x + rr, y), (x, y + rr), (x - rr, y)], fill=colour)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; choose one of {KINDS}")
    if dot is not None:
        d.ellipse([x - rr / 3, y - rr / 3 + rr * 0.15, x + rr / 3, y + rr / 3 + rr * 0.15], fill=dot)
    return img.resize((size, size), Image.LANCZOS)


def class_image(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A random member of the class: kind, colour, background, position and size all drawn from ``rng``."""
    colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    r = rng.uniform(0.22, 0.36)
    return render(KINDS[rng.integers(len(KINDS))], colour, background, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r),
                  r, size)


def instance_images(n: int = 5, size: int = 32, seed: int = 1) -> list[Image.Image]:
    """``n`` photos of the one instance: the same shape, at other positions, sizes and backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        r = rng.uniform(0.26, 0.34)
        out.append(render(INSTANCE["kind"], INSTANCE["colour"], BACKGROUNDS[i % len(BACKGROUNDS)],
                          rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r, size, INSTANCE["dot"]))
    return out


def any_shape(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A shape of any kind in any colour, with or without a dot: what the VAE learns to reconstruct."""
    rgb = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    r = rng.uniform(0.22, 0.36)
    return render(KINDS[rng.integers(len(KINDS))], rgb(), rgb(), rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r,
                  size, rgb() if rng.random() < 0.5 else None)


def _batch(rng: np.random.Generator, n: int, size: int, draw=class_image) -> torch.Tensor:
    """``[n, 3, size, size]`` images of ``draw`` in [-1, 1]."""
    arr = np.stack([np.asarray(draw(rng, size)) for _ in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, steps: int, batch: int, size: int, lr: float, seed: int) -> float:
    """Fit the VAE to renders of :func:`any_shape` (MSE + 1e-6 KL: an autoencoder first); returns the last MSE."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train().requires_grad_(True)
    mse = float("nan")
    for _ in range(steps):
        x = _batch(rng, batch, size, any_shape)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x)
        (loss + 1e-6 * dist.kl().mean()).backward()
        opt.step()
        opt.zero_grad()
        mse = float(loss.detach())
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # SDXL's convention: scaling_factor makes the scaled latents unit-variance
        std = vae.encode(_batch(rng, 64, size, any_shape)).latent_dist.mean.std()
    vae.register_to_config(scaling_factor=float(1 / std))
    return mse


def train_unet(pipe, steps: int, batch: int, size: int, lr: float, seed: int) -> float:
    """Fit the whole UNet to the class under :data:`CLASS_PROMPT` (epsilon loss, DDPM timesteps); last loss."""
    from ..noise import NoiseSchedule
    from ..sdxl import add_time_ids, encode_prompts, scale_latents, tokenize

    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    noise = NoiseSchedule(dict(pipe.scheduler.config))
    with torch.no_grad():
        emb, pooled = encode_prompts((pipe.text_encoder, pipe.text_encoder_2),
                                     [tokenize(t, [CLASS_PROMPT]) for t in (pipe.tokenizer, pipe.tokenizer_2)])
    emb, pooled = emb.expand(batch, -1, -1), pooled.expand(batch, -1)
    sz = torch.tensor([[size, size]] * batch)
    time_ids = add_time_ids(sz, torch.zeros(batch, 2, dtype=torch.long), sz)
    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    last = float("nan")
    for _ in range(steps):
        with torch.no_grad():
            latents = scale_latents(pipe.vae.encode(_batch(rng, batch, size)).latent_dist.sample(gen), pipe.vae.config)
        eps = torch.randn(latents.shape, generator=gen)
        t = noise.sample_timesteps(batch, gen)
        pred = unet(noise.add_noise(latents, eps, t), t, encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        last = float(loss.detach())
    unet.eval().requires_grad_(False)
    return last


def make_procedural(out: str = "data/_cache/procedural", size: int = 32, num_instance: int = 5,
                    vae_steps: int = 500, unet_steps: int = 600, batch: int = 16, lr: float = 1e-3, seed: int = 0,
                    overwrite: bool = False) -> str:
    """Render the instance photos into ``out/instance`` and teach the tiny base the class into ``out/base``.

    Args:
        out: output folder (``base/``: the pipeline, ``instance/``: the photos, ``class_samples.png``: what the
            base draws for "a photo of shape").
        size: image side in pixels (the tiny VAE downsamples by 8: 32 px is a 4x4 latent).
        num_instance: instance photos (the paper uses 3-5).
        vae_steps, unet_steps: optimisation steps of the two stages.
        batch: images per step.
        lr: AdamW learning rate of both stages.
        seed: seed of the base, the renders and the noise.
        overwrite: rebuild an existing base.
    """
    from diffusers import StableDiffusionXLPipeline

    from ..io import atomic_dir, check_output_dir, save_image
    from ..bases import make_base

    root = check_output_dir(out, "make-procedural", ours=("instance", "base", "random-tiny", "*.png", "*.json"))
    inst = root / "instance"
    inst.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(instance_images(num_instance, size, seed + 1)):
        save_image(inst / f"{i:02d}.png", img)
    base = root / "base"
    if (base / "model_index.json").exists() and not overwrite:
        return f"{base} exists (pass --overwrite true to retrain); instance photos in {inst}"
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(make_base("tiny", str(root / "random-tiny"), seed=seed))
    vae_mse = train_vae(pipe.vae, vae_steps, batch, size, lr, seed)
    unet_loss = train_unet(pipe, unet_steps, batch, size, lr, seed + 1)
    with atomic_dir(base, overwrite=True, option="--out", owner={"kind": "procedural-base"}) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    from ..sampling import generate

    pipe.set_progress_bar_config(disable=True)
    samples = generate(pipe, [CLASS_PROMPT] * 16, list(range(16)), steps=20, guidance=1.0, height=size, width=size)
    sheet = Image.new("RGB", (size * 8, size * 2))
    for k, im in enumerate(samples):
        sheet.paste(im, ((k % 8) * size, (k // 8) * size))
    save_image(root / "class_samples.png", sheet.resize((size * 32, size * 8), Image.NEAREST))
    return (f"base in {base} (VAE reconstruction MSE {vae_mse:.4f} on [-1, 1], last UNet loss {unet_loss:.4f}); "
            f"instance photos in {inst}; the base's own class samples in {root / 'class_samples.png'}")
