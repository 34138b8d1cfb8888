"""Magnitude sanity of LoRA files: the change ``ΔW = scale · alpha/r · B A`` (Hu et al. 2021, eq. 3) each adapted
module would add, measured as ``‖ΔW‖_F`` against the base weight's ``‖W‖_F``, refused past a bound no working
adapter reaches. A finite but absurd file (``lora_B`` = 1e30) passes the NaN/inf check and would otherwise sample
black or noise images, or be merged into a file of 1e30 weights, with exit status 0.

Bounds: ``‖ΔW‖ / ‖W‖`` at most :data:`MAX_RATIO` (a LoRA that changes a layer by ten times its own weights has
replaced it; published LoRAs were not measured here, having no hub access); without a base to compare with (``merge``
without ``--base``), ``‖ΔW‖`` at most :data:`MAX_NORM`. ``--force`` skips the check.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

MAX_RATIO = 10.0
MAX_NORM = 1e4


class MagnitudeError(ValueError):
    """A LoRA would change a layer by more than the bound; the message names the module, both norms and --force."""


def delta_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """``‖scale · up @ down‖_F`` without forming the product: ``tr((UᵀU)(DDᵀ))`` over r×r matrices, in float64
    (1e30 factors square to 1e60, past float32).

    Args:
        down: ``lora_A`` ([r, in] or conv [r, in, k, k]).
        up: ``lora_B`` ([out, r] or conv [out, r, 1, 1]).
        scale: ``lora_scale · alpha / r``.
    """
    d = down.detach().reshape(down.shape[0], -1).double()
    u = up.detach().reshape(up.shape[0], -1).double()
    sq = torch.trace((u.T @ u) @ (d @ d.T)).clamp_min(0)
    return abs(scale) * float(sq.sqrt())


def check_magnitude(weights: Mapping[str, torch.Tensor], alphas: Mapping[str, torch.Tensor], source: str,
                    base: Optional[Mapping[str, torch.Tensor]] = None, scale: float = 1.0, force: bool = False) -> None:
    """Refuse a LoRA whose largest ``‖ΔW‖`` exceeds :data:`MAX_RATIO` times its base weight's norm (or
    :data:`MAX_NORM` where the base weight is not given).

    Args:
        weights: the state dict in peft naming (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``); other
            adapter types (LoKr, LoHa) are not measured.
        alphas: ``<module>`` -> alpha (missing: alpha = rank).
        source: the file, for the message.
        base: ``<module>`` -> base weight of that module (None or missing: the absolute bound).
        scale: the weight the LoRA is applied with (``--lora_scale``, a merge weight).
        force: skip the check (``--force``).
    Raises:
        MagnitudeError: naming the module, ``‖ΔW‖``, ``‖W‖`` and ``--force``.
    """
    if force:
        return
    worst = None
    for key, down in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = weights.get(f"{module}.lora_B.weight")
        if up is None:
            continue
        rank = down.shape[0]
        norm = delta_norm(down, up, scale * float(alphas.get(module, rank)) / rank)
        w = base.get(module) if base is not None else None
        w_norm = float(w.detach().double().norm()) if w is not None else None
        ratio = norm / max(w_norm, 1e-12) if w_norm is not None else norm / MAX_NORM * MAX_RATIO
        if worst is None or ratio > worst[0]:
            worst = (ratio, module, norm, w_norm)
    if worst is None or worst[0] <= MAX_RATIO:
        return
    _, module, norm, w_norm = worst
    against = (f"{norm / w_norm:.3g} times the base weight's ‖W‖ = {w_norm:.3g} (bound {MAX_RATIO:g}x)"
               if w_norm is not None else f"beyond the bound of {MAX_NORM:g} (no base weight to compare with)")
    raise MagnitudeError(f"{source}: module {module!r} would change its layer by ‖ΔW‖ = {norm:.3g}, {against}: "
                         "no working LoRA comes near this, so the file is broken (a diverged run, wrong alpha, or "
                         "tampered weights). Use another file, or pass --force to use it anyway.")


def base_weights(components: Mapping[str, torch.nn.Module], modules) -> dict[str, torch.Tensor]:
    """``<component>.<path>`` -> that module's weight, for the adapted modules found in ``components``
    (``{"unet": pipe.unet, "text_encoder": ...}``)."""
    out = {}
    for m in modules:
        comp, _, path = m.partition(".")
        model = components.get(comp)
        for name in (path, path.removeprefix("text_model.")):  # kohya text-encoder names lack the prefix
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue
            weight = getattr(getattr(layer, "base_layer", layer), "weight", None)  # under an adapter loaded before
            if weight is not None and weight.device.type != "meta":  # a skeleton has shapes, no values
                out[m] = weight
                break
    return out
