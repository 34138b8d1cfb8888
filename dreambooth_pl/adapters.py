"""Adapter types through peft: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024, arXiv 2402.09353), LoKr (Kronecker
product, Yeh et al. 2024 "LyCORIS", arXiv 2309.14859) and LoHa (Hadamard product, Hyeon-Woo et al. 2022, FedPara).

One ``model.lora.adapter`` key picks the type; the other ``model.lora`` keys (rank, alpha, targets, init) apply
to every type.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import torch

from . import lora as lora_lib

AdapterType = Literal["lora", "dora", "lokr", "loha"]
# substrings of each type's peft parameter names: what trains, what a checkpoint holds
PARAM_MARKERS = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
                 "lokr": ("lokr_",), "loha": ("hada_",)}
# file layouts each type can be written in (diffusers' load_lora_weights reads LoRA and DoRA only)
LAYOUTS = {"lora": ("diffusers", "kohya"), "dora": ("diffusers", "kohya"), "lokr": ("kohya",), "loha": ("kohya",)}


class AdapterTypeError(ValueError):
    """A format, merge method or setting that cannot represent an adapter type; the message names both."""


def check_settings(kind: str, dropout: float) -> None:
    """Refuse an unknown type, or a setting the type lacks, before any model loads."""
    if kind not in PARAM_MARKERS:
        raise AdapterTypeError(f"model.lora.adapter must be lora, dora, lokr or loha, got {kind!r}")
    if dropout and kind in ("lokr", "loha"):
        raise AdapterTypeError(f"model.lora.dropout={dropout} is an input dropout of LoRA/DoRA; "
                               f"model.lora.adapter={kind} has none: set model.lora.dropout: 0.")


def adapter_config(kind: AdapterType, rank: int, alpha: float | None = None, dropout: float = 0.0,
                   target_modules: Sequence[str] = lora_lib.UNET_TARGETS, init: bool | str = True):
    """The peft config of adapter type ``kind``.

    Args:
        kind: ``lora``, ``dora`` (LoRA plus a learned per-output-row magnitude), ``lokr`` or ``loha``.
        rank: rank r (> 0); for LoKr the rank of the decomposed Kronecker factor.
        alpha: scale numerator, the update is scaled by ``alpha / r`` (None: r, scale 1).
        dropout: LoRA/DoRA input dropout; LoKr/LoHa have none (refused when > 0).
        target_modules: module-name suffixes to adapt.
        init: LoRA/DoRA: peft's ``init_lora_weights``; LoKr/LoHa: ``init_weights`` (True: the update starts at 0,
            False: random, for tests); a LoRA-only string init (e.g. ``gaussian``) gives LoKr/LoHa True.
    """
    if kind in ("lora", "dora"):
        cfg = lora_lib.lora_config(rank, alpha, dropout, target_modules, init)
        cfg.use_dora = kind == "dora"
        return cfg
    check_settings(kind, dropout)
    if rank <= 0:
        raise AdapterTypeError(f"model.lora.rank must be > 0, got {rank}")
    from peft import LoHaConfig, LoKrConfig

    config_class = LoKrConfig if kind == "lokr" else LoHaConfig
    return config_class(r=rank, alpha=alpha if alpha is not None else rank, target_modules=list(target_modules),
                        init_weights=init if isinstance(init, bool) else True)


def add_adapter(model: torch.nn.Module, kind: AdapterType, config) -> list[torch.nn.Parameter]:
    """Inject ``config`` into ``model`` (diffusers UNet or transformers CLIP); returns its trainable parameters."""
    return lora_lib.add_lora(model, config, markers=PARAM_MARKERS[kind])


def check_layout(kind: AdapterType, layout: str, what: str = "export") -> None:
    """Refuse writing adapter type ``kind`` in a file ``layout`` that cannot hold it, naming the alternative."""
    if layout not in LAYOUTS[kind]:
        raise AdapterTypeError(f"{what}: the {layout} layout cannot represent {kind.upper()} adapters "
                               f"(diffusers' load_lora_weights reads LoRA and DoRA only); write {kind.upper()} in the "
                               "kohya/LyCORIS layout (format: kohya) that A1111, ComfyUI and Forge load.")


def save_adapter(path: str | os.PathLike, kind: AdapterType, models: dict[str, torch.nn.Module | None],
                 layout: Literal["auto", "diffusers", "kohya"] = "auto") -> Path:
    """Write the ``default`` adapter of live ``models`` (``{"unet": ..., "text_encoder": ..., ...}``) to ``path``.

    Args:
        path: ``.safetensors`` file (a folder gets ``pytorch_lora_weights.safetensors`` inside).
        kind: the adapter type the models carry.
        models: component name -> model (None: skipped).
        layout: ``diffusers``, ``kohya`` (LoRA: kohya's; DoRA/LoKr/LoHa: LyCORIS's), or ``auto`` (the first of
            ``LAYOUTS[kind]``).
    """
    from . import formats, lora_state, lycoris

    layout = LAYOUTS[kind][0] if layout == "auto" else layout
    check_layout(kind, layout)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / lora_lib.LORA_FILE
    if layout == "diffusers":
        return lora_lib.save_diffusers_lora(path, models["unet"], models.get("text_encoder"),
                                            models.get("text_encoder_2"))
    if kind == "lora":
        return formats.write_lora(lora_state.uniform_alpha(lora_state.from_models(models)), path, "kohya")
    return lycoris.write_lycoris(lycoris.module_tensors(models), kind, path)
