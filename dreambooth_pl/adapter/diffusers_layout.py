"""The diffusers/peft key layout that ``StableDiffusionXLPipeline.load_lora_weights`` reads (LoRA and DoRA).

Keys are ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_magnitude_vector`` for DoRA; ``text_encoder.``
/ ``text_encoder_2.`` for the text encoders), alpha and rank in the safetensors header (``lora_adapter_metadata``,
a peft ``LoraConfig`` per component). Older diffusers naming is read through diffusers' own converters.
"""
from __future__ import annotations

import collections

import torch

from .kinds import kind_of
from .value import COMPONENTS, Adapter, check_keys, on_disk_name

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_TE_MAGNITUDE = ".lora_magnitude_vector.weight"


def _alpha_from_config(cfg: dict, module: str, rank: int) -> float:
    """The alpha peft gives ``module`` under LoraConfig ``cfg`` (``alpha_pattern`` first, then ``lora_alpha``)."""
    from peft.utils.other import get_pattern_key

    pattern = cfg.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module) if pattern else None
    if key in pattern:
        return float(pattern[key])
    return float(cfg.get("lora_alpha") or rank)


def from_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict | None = None,
                   source: str = "state dict") -> Adapter:
    """Read a diffusers-layout state dict (peft or older diffusers naming) and its ``lora_adapter_metadata``."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    weights: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in state_dict.items() if k.split(".", 1)[0] == comp}
        if part and not any(".lora_A." in k for k in part):  # older diffusers naming: its own converters
            # the old mapping also covers the newer lora_linear_layer names, so a file mixing both converts
            part = (convert_unet_state_dict_to_peft(part) if comp == "unet" else
                    convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS_OLD))
        for k, v in part.items():  # a text encoder's DoRA magnitude is written with .weight (to_diffusers)
            k = k.removesuffix(".weight") if k.endswith(_TE_MAGNITUDE) else k
            weights[f"{comp}.{on_disk_name(comp, k)}"] = v
    adapter = check_keys(Adapter(weights, kind=kind_of(weights)), source)
    for m in adapter.modules():
        comp, name = m.split(".", 1)
        cfg = {k[len(comp) + 1:]: v for k, v in (metadata or {}).items() if k.split(".", 1)[0] == comp}
        if cfg:
            adapter.alphas[m] = torch.tensor(_alpha_from_config(cfg, name.removeprefix("text_model."),
                                                                adapter.rank(m)))
    return adapter


def config_dict(adapter: Adapter, component: str) -> dict:
    """The peft ``LoraConfig`` fields that reproduce ``component``'s ranks, alphas and kind (diffusers' metadata;
    also the peft config apply.py builds).

    Names drop ``text_model.``: peft matches them as suffixes, so they fit CLIP with and without that level.
    """
    mods = [m for m in adapter.modules() if m.split(".", 1)[0] == component]
    ranks = {m.split(".", 1)[1].removeprefix("text_model."): adapter.rank(m) for m in mods}
    alphas = {m.split(".", 1)[1].removeprefix("text_model."): float(adapter.alphas[m]) for m in mods}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "use_dora": adapter.kind == "dora",
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}}


def to_diffusers(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    """The diffusers state dict and its header metadata (``{"unet.r": ..., "unet.lora_alpha": ...}``)."""
    tensors = {}
    for k, v in adapter.weights.items():
        # transformers' adapter loader finds a text encoder's DoRA magnitude only as ...lora_magnitude_vector.weight
        # (without the suffix it re-initialises it from the base norms); the UNet's loader takes peft's plain name
        te_magnitude = not k.startswith("unet.") and k.endswith("lora_magnitude_vector")
        tensors[k + ".weight" if te_magnitude else k] = v
    meta = {f"{c}.{k}": v for c in COMPONENTS if adapter.component(c) for k, v in config_dict(adapter, c).items()}
    return tensors, meta
