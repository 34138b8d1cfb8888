"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685) through peft: injection, trainable filter, diffusers-format export."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .io import write_bytes

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float | None = None, dropout: float = 0.0,
                target_modules: Sequence[str] = UNET_TARGETS, init: bool | str = "gaussian"):
    """A peft ``LoraConfig``; ``alpha`` defaults to ``rank`` (scale 1), ``init=False`` starts B non-zero (tests).

    Args:
        rank: adapter rank r (> 0).
        alpha: scale numerator; the adapter adds ``alpha / r * B A x``.
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes to adapt.
        init: peft's ``init_lora_weights``. ``"gaussian"`` (A normal with std 1/r, B = 0) is what diffusers'
            ``train_dreambooth_lora_sdxl.py`` uses and what its LR of 1e-4 was tuned for; ``True`` is peft's
            Kaiming-uniform A (std ~ 1/sqrt(3 fan_in): 10-20x smaller at SDXL widths), B = 0; both start at the
            base model. ``False`` starts B non-zero (tests that need the adapter to change the output).
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      init_lora_weights=init, target_modules=list(target_modules))


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default",
             markers: Sequence[str] = ("lora_",)) -> list[torch.nn.Parameter]:
    """Inject an adapter into a diffusers UNet or transformers text encoder; returns its (trainable) parameters
    (those whose names contain one of ``markers``: ``lokr_`` / ``hada_`` for LoKr / LoHa, see adapters.py)."""
    model.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in model.named_parameters() if any(k in n for k in markers)]
    if not params:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules {config.target_modules}")
    for p in params:  # adapters train in fp32 even when the frozen base is fp16/bf16
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming without the adapter name (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def adapter_metadata(model: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's LoraConfig as a dict, stored in the safetensors header so loaders recover rank and alpha."""
    cfg = model.peft_config[adapter_name].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    return cfg


def save_diffusers_lora(path: str | os.PathLike, unet: torch.nn.Module | None = None,
                        text_encoder: torch.nn.Module | None = None,
                        text_encoder_2: torch.nn.Module | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``path`` in the layout ``StableDiffusionXLPipeline.load_lora_weights`` reads, atomically.

    Args:
        path: output ``.safetensors`` file (a folder gets ``pytorch_lora_weights.safetensors`` inside).
        unet, text_encoder, text_encoder_2: models carrying a peft adapter named ``default`` (None: skipped).
        dtype: storage dtype of the weights.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE
    kwargs = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None and getattr(model, "peft_config", None):
            kwargs[f"{name}_lora_layers"] = {_te_dora_key(name, k): v.detach().to("cpu", dtype).contiguous()
                                             for k, v in lora_state_dict(model).items()}
            kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(model)
    if not kwargs:
        raise ValueError(f"nothing to save to {str(path)!r}: none of the given models carries a LoRA adapter "
                         "(call add_lora first, or export from a trained DreamBoothLoRA).")
    with tempfile.TemporaryDirectory(prefix="dbpl-lora-") as tmp:  # diffusers writes folders; io makes it atomic
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name=LORA_FILE, safe_serialization=True, **kwargs)
        return write_bytes(path, (Path(tmp) / LORA_FILE).read_bytes())


def _te_dora_key(component: str, key: str) -> str:
    """transformers' adapter loader finds a text encoder's DoRA magnitude only as ``...lora_magnitude_vector.weight``
    (without the suffix it re-initialises it from the base norms); the UNet's loader takes peft's plain name."""
    return f"{key}.weight" if component != "unet" and key.endswith("lora_magnitude_vector") else key
