"""Held-out validation loss: the training loss (DreamBooth eq. 2) on held-out photos at noise and timesteps fixed
per photo, so its curve is comparable across steps and runs (``data.photos.held_out``, data/validation.py).

Each photo is scored at ``TIMESTEPS`` evenly spaced timesteps ``t_k = floor((k + 1/2) T / K)`` with noise drawn on
the CPU from a generator seeded by the photo's ``val_id`` (the same values on any device), on the mean of its VAE
latent distribution (no sampling). The same weights therefore give the same value in every run.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

from .noise import mix_seed
from .sdxl import encode_prompts, scale_latents, tokenize

TIMESTEPS = 4
NOISE_SALT = 0x7A1


def fixed_timesteps(num_train_timesteps: int, k: int = TIMESTEPS) -> torch.Tensor:
    """``k`` evenly spaced timesteps ``floor((j + 1/2) T / k)``: 125, 375, 625, 875 for T = 1000, k = 4."""
    return torch.tensor([int((j + 0.5) * num_train_timesteps / k) for j in range(k)])


def fixed_noise(val_id: int, shape: tuple[int, ...], k: int = TIMESTEPS) -> torch.Tensor:
    """``[k, *shape]`` standard normal noise of photo ``val_id``, drawn on the CPU."""
    gen = torch.Generator().manual_seed(mix_seed(val_id, NOISE_SALT))
    return torch.randn((k, *shape), generator=gen)


class HeldOutLoss(Metric):
    """Mean instance and prior losses over the held-out photos, and ``loss = instance + w * prior`` as training
    combines them; sums reduce across processes. The VAE latents of each photo are kept after the first pass
    (photos and VAE are frozen).

    Args:
        prior_loss_weight: the training loss's ``w``.
    """

    full_state_update = False

    def __init__(self, prior_loss_weight: float, **kwargs):
        super().__init__(**kwargs)
        self.prior_loss_weight = prior_loss_weight
        for name, dtype in (("instance", torch.float64), ("prior", torch.float64), ("n_instance", torch.long),
                            ("n_prior", torch.long)):
            self.add_state(name, torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")
        self.latents: dict[int, torch.Tensor] = {}

    def update(self, module, batch: dict) -> None:
        """Score one held-out photo (a batch from ``HeldOutSet``) with ``module``'s current weights.

        Args:
            module: the :class:`~dreambooth_pl.module.DreamBoothLoRA` (its ``loss_at`` computes the loss).
            batch: one held-out example.
        """
        val_id, prior = int(batch["val_id"][0]), bool(batch["is_prior"][0])
        latents = self._latents(module, val_id, batch["pixel_values"])
        t = fixed_timesteps(module.noise.num_train_timesteps).to(module.device)
        noise = fixed_noise(val_id, tuple(latents.shape[1:])).to(module.device)
        emb, pooled = _prompt_embeddings(module, batch["prompt"][0])
        k = TIMESTEPS
        copies = {"prompt_embeds": emb.to(module.device).expand(k, -1, -1),
                  "pooled_prompt_embeds": pooled.to(module.device).expand(k, -1), "prompt": batch["prompt"] * k,
                  "original_size": batch["original_size"].expand(k, -1),
                  "crop_top_left": batch["crop_top_left"].expand(k, -1),
                  "is_prior": batch["is_prior"].expand(k).to(module.device)}
        terms = module.loss_at(copies, latents.expand(k, -1, -1, -1), noise, t)
        if prior:
            self.prior += terms["loss_prior"].double() * k
            self.n_prior += k
        else:
            self.instance += terms["loss_instance"].double() * k
            self.n_instance += k

    def _latents(self, module, val_id: int, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latent mean of the photo, encoded where the VAE is (the CPU where ``perf.cache`` moved it
        there for room, else the GPU: ``memory_plan.room_for_encoders``)."""
        if val_id not in self.latents:
            vae = module.vae
            device = next(vae.parameters()).device
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float()
            self.latents[val_id] = scale_latents(mean, vae.config).cpu()
        return self.latents[val_id].to(module.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """``loss``, and ``loss_instance`` / ``loss_prior`` where photos of that kind were held out."""
        inst = (self.instance / self.n_instance.clamp(min=1)).float()
        prior = (self.prior / self.n_prior.clamp(min=1)).float()
        out = {"loss": inst + self.prior_loss_weight * prior}
        if self.n_instance:
            out["loss_instance"] = inst
        if self.n_prior:
            out["loss_prior"] = prior
        return out


def _prompt_embeddings(module, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([1, 77, d], [1, d2])`` of ``prompt``: from the data module's cache (``perf.cache: all``; the text encoders
    may be on the CPU by then) when it holds the prompt, else encoded now (not through ``module.encode_text``, whose
    cache would keep inference-mode tensors that training cannot use)."""
    cache = getattr(getattr(module.trainer, "datamodule", None), "cache", None)
    text = cache.text if cache is not None else {}
    if prompt in text:
        emb, pooled = text[prompt]
        return emb[None], pooled[None]
    with torch.no_grad():
        return encode_prompts((module.text_encoder, module.text_encoder_2),
                              [tokenize(tok, [prompt]) for tok in module.tokenizers])
