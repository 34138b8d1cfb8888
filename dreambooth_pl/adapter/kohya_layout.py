"""The kohya/LyCORIS key layout that A1111, ComfyUI, Forge and sd-scripts load, for every adapter kind.

Keys are ``lora_unet_<module_with_underscores>.<param>`` (``lora_te1_`` / ``lora_te2_`` for the text encoders, SGM
block names such as ``input_blocks_4_1`` accepted) plus ``.alpha``; params keep the kind's kohya/LyCORIS names
(``KINDS[kind].kohya``): ``lora_down.weight`` / ``lora_up.weight``, ``dora_scale`` (DoRA, ``[out, 1]``),
``lokr_w1`` / ``lokr_w1_a`` / ... (LoKr), ``hada_w1_a`` / ... (LoHa). Module names are mapped back through diffusers'
own converter, one module at a time, so each kohya name maps to exactly one peft module (and its alpha). Both
directions keep every value exactly.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from .kinds import KINDS, kind_of
from .value import Adapter, AdapterFormatError, check_keys, on_disk_name

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
READ_PREFIXES = (*PREFIX.values(), "lora_te_")  # lora_te_: SD 1.x files' one text encoder, read as the first
_PARAMS = "|".join(re.escape(KINDS[k].kohya.get(p, p)) for k in KINDS for p in KINDS[k].params)
_KEY = re.compile(rf"^(lora_unet|lora_te1|lora_te2|lora_te)_\w+\.({_PARAMS}|alpha)$")


def kohya_name(component: str, module: str) -> str:
    """``lora_unet_down_blocks_1_..._to_q`` for UNet module ``down_blocks.1....to_q``."""
    return PREFIX[component] + on_disk_name(component, module).replace(".", "_")


def _module(name: str, source: str) -> str:
    """The peft module (component-prefixed) a kohya module name stands for, through diffusers' converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    one = torch.zeros(1, 1)
    try:
        converted = _convert_non_diffusers_lora_to_diffusers({f"{name}.lora_down.weight": one,
                                                              f"{name}.lora_up.weight": one})[0]
        comp = next(iter(converted)).split(".", 1)[0]
        part = {k[len(comp) + 1:]: v for k, v in converted.items()}
        if not any(".lora_A." in k for k in part):  # the old mapping covers the newer lora_linear_layer names too
            part = (convert_unet_state_dict_to_peft(part) if comp == "unet" else
                    convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS_OLD))
        (peft_key,) = [k for k in part if k.endswith(".lora_A.weight")]
    except (ValueError, KeyError, StopIteration) as e:
        raise AdapterFormatError(f"{source}: cannot map kohya module {name!r} to a diffusers module ({e}).") from None
    return f"{comp}.{on_disk_name(comp, peft_key[: -len('.lora_A.weight')])}"


def from_kohya(state_dict: dict[str, torch.Tensor], unet_config=None, source: str = "state dict") -> Adapter:
    """Read a kohya/LyCORIS-layout state dict of any kind.

    Args:
        state_dict: ``lora_unet_*`` / ``lora_te1_*`` / ``lora_te2_*`` keys with ``.alpha``.
        unet_config: the base UNet's config, needed only for SGM names (``input_blocks_4_1``); default SDXL's.
        source: file name for error messages.
    """
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    for k in state_dict:
        if not _KEY.match(k):
            raise AdapterFormatError(f"{source}: kohya key {k!r} is not <lora_unet_|lora_te1_|lora_te2_>NAME.<param> "
                                     f"with a param of LoRA, DoRA, LoKr or LoHa (lora_down.weight, lora_up.weight, "
                                     "dora_scale, lokr_*, hada_*) or alpha.")
    kind = KINDS[kind_of(state_dict)]
    peft_name = {kind.kohya.get(p, p): p for p in kind.params}
    sd = _maybe_map_sgm_blocks_to_diffusers(dict(state_dict), unet_config or SimpleNamespace(layers_per_block=2))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, param = key.partition(".")
        groups.setdefault(name, {})[param] = value
    weights, alphas = {}, {}
    for name, params in groups.items():
        if set(params) <= {"alpha", "lora_up.weight", "dora_scale"}:
            raise AdapterFormatError(f"{source}: key {name!r} has {', '.join(sorted(params))} but no "
                                     f"{'lora_down.weight' if kind.name in ('lora', 'dora') else kind.params[0]}.")
        module = _module(name, source)
        for param, value in params.items():
            if param == "alpha":
                alphas[module] = value
            elif param in peft_name:
                weights[f"{module}.{peft_name[param]}"] = value.reshape(-1) if param == "dora_scale" else value
            else:
                raise AdapterFormatError(f"{source}: key {name}.{param} is not a {kind.title} parameter; the file "
                                         "mixes adapter kinds.")
    adapter = check_keys(Adapter(weights, {}, kind.name), source)
    for m in adapter.modules():  # LoKr with no decomposed factor: readers scale by 1, which alpha = r keeps
        full = kind.name == "lokr" and "lokr_w1" in adapter.params(m) and "lokr_w2" in adapter.params(m)
        adapter.alphas[m] = torch.tensor(float(adapter.rank(m))) if full or m not in alphas else alphas[m]
    return adapter


def to_kohya(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS state dict of ``adapter``, each module's update equal to peft's."""
    kind, sd = KINDS[adapter.kind], {}
    for module in adapter.modules():
        comp, name = module.split(".", 1)
        prefix = PREFIX[comp] + name.replace(".", "_")
        for p, v in adapter.params(module).items():
            if p == "lora_magnitude_vector":
                v = v.reshape(-1, 1)  # LyCORIS/ComfyUI: [out, 1] marks the norm over each output row, as peft's
            sd[f"{prefix}.{kind.kohya.get(p, p)}"] = v.detach().to("cpu").contiguous()
        sd[f"{prefix}.alpha"] = adapter.alphas[module]
    return sd
