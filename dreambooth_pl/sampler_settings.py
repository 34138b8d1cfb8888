"""How images are drawn (:class:`SamplerSettings`), importable without torch or diffusers: the grid and subject
files of ``ablate`` and ``fit-many`` are parsed by a driver and Ray workers that never load a model, and each of
those imports cost about 3 s (sampling.py builds the schedulers and pipelines from these settings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# the keys of sampling.SCHEDULERS, in its order (tests/test_sampling.py checks the two agree)
SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "euler", "euler_a", "heun", "dpmpp_2m", "unipc")


class SamplingError(ValueError):
    """Bad sampling input (scheduler, size, seeds, dtype); the message names the value and the fix."""


@dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn: the one sampler type of every sampling site (``sample``, ``evaluate-suite``, class
    images, ablation grids), passed whole. Which images (seeds) and their size stay with each site: their defaults
    differ (``data.resolution`` for class images, the base's native size elsewhere).

    Args:
        scheduler: one of :data:`SCHEDULER_NAMES` (``sampling.SCHEDULERS`` builds it).
        steps: denoising steps.
        guidance: classifier-free guidance scale (Ho & Salimans 2022); SDXL's usual 5, <= 1 turns it off.
        negative_prompt: prompt to steer away from (None: SDXL's zero unconditional embedding).
    """

    scheduler: str = "euler"
    steps: int = 25
    guidance: float = 5.0
    negative_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise SamplingError(f"sampler.scheduler {self.scheduler!r} is unknown; choose one of: "
                                f"{', '.join(SCHEDULER_NAMES)}")
        if self.steps < 1:
            raise SamplingError(f"sampler.steps must be >= 1, got {self.steps}")


SAMPLER = SamplerSettings()
