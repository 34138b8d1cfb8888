"""Does an adapter fit a base model? Module names and (out, in) sizes checked against the base's layers, built on
the meta device when only the check is needed, so a file for another base is refused before any weights load."""
from __future__ import annotations

import torch

from . import maths
from .value import Adapter, AdapterFormatError


def base_skeleton(base: str) -> dict[str, torch.nn.Module]:
    """UNet and text encoders of ``base`` built on the meta device: module names and shapes, no weights loaded.

    Args:
        base: SDXL pipeline folder or hub id.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..sdxl import resolve_base

    root = resolve_base(base)
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root, subfolder="text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(root, subfolder="text_encoder_2"))}



def check_base(adapter: Adapter, models: dict[str, torch.nn.Module], source: str = "adapter") -> None:
    """Every adapted module exists in the base with matching in/out sizes, else an error naming the key.

    Args:
        adapter: the adapter.
        models: ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` of the base it will be applied to.
        source: name for error messages.
    """
    found = {c: dict(m.named_modules()) for c, m in models.items() if m is not None}
    for module in adapter.modules():
        comp, name = module.split(".", 1)
        layer = found.get(comp, {}).get(name, found.get(comp, {}).get(name.removeprefix("text_model.")))
        layer = getattr(layer, "base_layer", layer)  # the base may already carry a peft adapter
        weight = getattr(layer, "weight", None)
        key = f"{module}.{next(iter(adapter.params(module)))}"
        if weight is None:
            raise AdapterFormatError(f"{source}: key {key} adapts {name!r}, which the base's {comp} does not have: "
                                     "the adapter was trained on a different base model.")
        if adapter.kind in ("lora", "dora") and adapter.down(module).dim() != weight.dim():
            raise AdapterFormatError(f"{source}: key {key} is {adapter.down(module).dim()}-D but the base's {name} "
                                     f"weight is {weight.dim()}-D: the file is damaged or for another base.")
        want, got = (weight.shape[0], weight.shape[1]), tuple(maths.io_shape(adapter.params(module)))
        if want != got:
            raise AdapterFormatError(f"{source}: key {key} expects a layer of (out, in) = {got} but the base's "
                                     f"{name} is {want}: the adapter was trained on a different base model.")
