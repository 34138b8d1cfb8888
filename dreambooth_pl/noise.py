"""Forward diffusion for training: timestep sampling, noising, prediction targets and SNR (DDPM, Ho et al. 2020)."""
from __future__ import annotations

import torch


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
