"""The adapters' optimizer: AdamW, 8-bit AdamW or Prodigy (Mishchenko & Defazio 2023, arXiv 2306.06101)."""
from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

OptimizerName = Literal["adamw", "adamw8bit", "prodigy"]


def build_optimizer(name: OptimizerName, groups: list[dict], weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer ``name`` over parameter ``groups`` (each with its ``lr``).

    Args:
        name: ``adamw``; ``adamw8bit`` (needs CUDA, else AdamW with a warning); ``prodigy`` (d-adaptation: the
            group ``lr`` multiplies its step-size estimate, 1.0 by convention; safeguard warm-up and Adam bias
            correction on, as its authors recommend for diffusion fine-tuning).
        groups: torch parameter groups.
        weight_decay: decoupled weight decay.
        device: where the parameters live (picks fused AdamW on CUDA).
        betas, eps: the Adam moments' decays and the denominator's epsilon (Kingma & Ba 2015, alg. 1).
    """
    if name == "adamw8bit" and device.type != "cuda":
        rank_zero_warn("model.optim.name=adamw8bit needs a CUDA GPU (bitsandbytes); using torch AdamW on "
                       f"{device.type}.")
    if name == "adamw8bit" and device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "prodigy":
        from prodigyopt import Prodigy

        low = [g["lr"] for g in groups if g["lr"] < 0.1]
        if low:
            rank_zero_warn(f"model.optim.name=prodigy with learning rate {low[0]:g}: Prodigy's learning rate "
                           "multiplies its own step-size estimate, so 1.0 is the convention (set "
                           "model.optim.learning_rate: 1.0); "
                           f"{low[0]:g} trains about {1 / low[0]:g}x slower than Prodigy intends.")
        return Prodigy(groups, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                       safeguard_warmup=True, betas=betas, eps=eps)
    if name not in ("adamw", "adamw8bit"):
        raise ValueError(f"model.optim.name must be adamw, adamw8bit or prodigy, got {name!r}")
    return torch.optim.AdamW(groups, weight_decay=weight_decay, betas=betas, eps=eps, fused=device.type == "cuda")


def clip_gradients(module, optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None) -> None:
    """Lightning's gradient clipping (``trainer.gradient_clip_val``/``_algorithm``), also for fused AdamW under mixed
    precision, which Lightning's plugin refuses because the fused step unscales fp16 gradients itself, after the
    clip would have run (it refuses under bf16 too): here the gradients are unscaled first (GradScaler then hands
    the fused step its found-inf flags and no scale), then clipped as Lightning clips.

    Args:
        module: the LightningModule (its trainer's precision plugin holds the scaler).
        optimizer: the optimizer about to step.
        value: the clip value (None or 0: no clipping).
        algorithm: ``norm`` (default) or ``value``.
    """
    if not value:
        return
    if not getattr(optimizer, "_step_supports_amp_scaling", False):  # every other optimizer: Lightning's own path
        module.clip_gradients(optimizer, value, algorithm)
        return
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


def step_size_estimates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Prodigy's adapted step size ``d * lr`` per parameter group (empty for optimizers that do not adapt it)."""
    return {f"train/prodigy_d_lr/pg{i}": float(g["d"]) * float(g["lr"])
            for i, g in enumerate(optimizer.param_groups) if "d" in g and "d_numerator" in g}
