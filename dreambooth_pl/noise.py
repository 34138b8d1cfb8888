"""Forward diffusion for training: timestep sampling, noising, prediction targets and SNR (DDPM, Ho et al. 2020)."""
from __future__ import annotations

from typing import Sequence

import torch


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser), so nearby indices get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def example_id(position: int, role: int) -> int:
    """The stream-wide id of an example: global sample ``position`` (the same on any rank or node) and ``role``
    (0 for the instance photo, 1 for its class partner)."""
    return 2 * position + role


class NoiseSchedule(torch.nn.Module):
    """The base's discrete noise schedule (betas from its scheduler config), as buffers on the model's device.

    Args:
        scheduler_config: the base's ``scheduler/scheduler_config.json`` as a dict.
    """

    def __init__(self, scheduler_config: dict):
        super().__init__()
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.float(), persistent=False)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, T)."""
        device = self.alphas_cumprod.device
        return torch.randint(0, self.num_train_timesteps, (n,), device=device, generator=generator)

    def draw(self, seed: int, ids: Sequence[int], shape: tuple[int, ...], latent_eps: bool, offset: bool,
             device: torch.device) -> dict[str, torch.Tensor]:
        """Each example's training draws from a generator of its own, seeded by (``seed``, its id): the latent
        sample's eps (``latent_eps``: from a stored or encoded distribution), the noise, the offset-noise shift
        (``offset``) and the timestep, stacked. An example draws the same numbers whatever batch, micro-batch, rank
        or node it lands in, so one process with the global batch trains what DDP over machines trains (issue 25).

        Args:
            seed: the run's seed (``model.seed``).
            ids: the examples' stream-wide ids (:func:`example_id`).
            shape: one example's latent shape (C, H, W).
        """
        out: dict[str, list[torch.Tensor]] = {"eps": [], "noise": [], "offset": [], "t": []}
        for i in ids:
            gen = torch.Generator(device).manual_seed(mix_seed(seed, i))
            if latent_eps:
                out["eps"].append(torch.randn(shape, generator=gen, device=device))
            out["noise"].append(torch.randn(shape, generator=gen, device=device))
            if offset:
                out["offset"].append(torch.randn((shape[0], 1, 1), generator=gen, device=device))
            out["t"].append(torch.randint(0, self.num_train_timesteps, (1,), device=device, generator=gen))
        return {k: (torch.cat(v) if k == "t" else torch.stack(v)) for k, v in out.items() if v}

    def _coefs(self, t: torch.Tensor, ndim: int):
        a = self.alphas_cumprod[t].view(-1, *([1] * (ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
        sa, s1a = self._coefs(t, x0.ndim)
        return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps for epsilon models; v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, sec. 4)."""
        if self.prediction_type == "epsilon":
            return noise
        sa, s1a = self._coefs(t, x0.ndim)
        return (sa * noise.float() - s1a * x0.float()).to(noise.dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t)."""
        a = self.alphas_cumprod[t]
        return a / (1 - a)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 7): min(SNR, g) / SNR, or / (SNR + 1) for v targets."""
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1 if self.prediction_type == "v_prediction" else snr)
