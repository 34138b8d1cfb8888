"""Put an :class:`~.value.Adapter` of any kind onto base models as a named peft adapter: the same peft layers fit
trains, built from the value's ranks and alphas, its tensors copied in. So a file sampled here gives the outputs of
the model that wrote it, whatever its kind or layout, and several adapters mix at their scales through diffusers'
``set_adapters`` as loaded LoRAs do.
"""
from __future__ import annotations

import torch

from .diffusers_layout import config_dict
from .kinds import KINDS, add_adapter, peft_config
from .value import COMPONENTS, Adapter, AdapterFormatError, on_disk_name


@torch.no_grad()
def apply_adapter(models: dict[str, torch.nn.Module], adapter: Adapter, name: str) -> None:
    """Inject ``adapter`` into ``models`` as peft adapter ``name`` (active, scale 1), its tensors copied in.

    Args:
        models: ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` the adapter fits (base.check_base).
        adapter: the adapter.
        name: the peft adapter name (unique among the models' adapters).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in COMPONENTS:
        mods = [m for m in adapter.modules() if m.split(".", 1)[0] == comp]
        if not mods:
            continue
        if models.get(comp) is None:
            raise AdapterFormatError(f"the adapter adapts the {comp}, which was not given.")
        model, cfg = models[comp], config_dict(adapter, comp)
        decompose_both = any("lokr_w1_a" in adapter.params(m) for m in mods)
        add_adapter(model, adapter.kind, peft_config(adapter.kind, cfg["r"], cfg["lora_alpha"], 0.0,
                                                     cfg["target_modules"], True, cfg["rank_pattern"],
                                                     cfg["alpha_pattern"], decompose_both), name, train=False)
        layers = {on_disk_name(comp, n): layer for n, layer in model.named_modules()
                  if isinstance(layer, BaseTunerLayer) and name in layer.scaling}
        for m in mods:
            layer = layers.get(m.split(".", 1)[1])
            for p, value in adapter.params(m).items():
                attr, _, leaf = p.partition(".")
                holder = getattr(layer, attr, None)
                target = holder[name] if holder is not None and name in holder else None
                if isinstance(target, torch.nn.Module):  # lora_A.weight, DoRA's magnitude layer
                    target = target.weight
                if target is None or target.shape != value.shape:
                    got = None if target is None else tuple(target.shape)
                    raise AdapterFormatError(f"{m}.{p}: peft builds this {KINDS[adapter.kind].title} layer with "
                                             f"shape {got}, the file holds {tuple(value.shape)}: the file's "
                                             "factorisation is not one peft makes (another trainer's settings).")
                target.copy_(value)
