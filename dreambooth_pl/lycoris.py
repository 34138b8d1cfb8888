"""DoRA, LoKr and LoHa files in the kohya/LyCORIS key layout that A1111, ComfyUI, Forge and sd-scripts load.

Keys are ``lora_unet_<module_with_underscores>.<param>`` (``lora_te1_`` / ``lora_te2_`` for the text encoders)
plus ``.alpha``; params keep LyCORIS's names: ``lora_down.weight`` / ``lora_up.weight`` / ``dora_scale`` (DoRA,
``[out, 1]``), ``lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b`` / ``lokr_w2`` / ``lokr_w2_a`` / ``lokr_w2_b`` (LoKr),
``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` (LoHa). :func:`merged_weight` is the readers' maths
(LyCORIS's modules, ComfyUI's ``weight_adapter``), so a written file can be checked against peft's own layers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .lora_state import on_disk_name

PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# peft parameter name -> LyCORIS parameter name (the rest are spelled alike)
RENAME = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
          "lora_magnitude_vector": "dora_scale"}
PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
          "lokr_w2_a", "lokr_w2_b", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
ALGO = {"dora": "lora", "lokr": "lokr", "loha": "loha"}


def kohya_name(component: str, module: str) -> str:
    """``lora_unet_down_blocks_1_..._to_q`` for UNet module ``down_blocks.1....to_q``."""
    return PREFIX[component] + on_disk_name(component, module).replace(".", "_")


def module_tensors(models: dict[str, torch.nn.Module | None],
                   adapter_name: str = "default") -> dict[str, tuple[dict[str, torch.Tensor], float, int]]:
    """``kohya name -> ({peft param: tensor}, alpha, r)`` of every adapted layer in live peft models."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp, model in models.items():
        for name, layer in (model.named_modules() if model is not None else ()):
            if not isinstance(layer, BaseTunerLayer) or adapter_name not in getattr(layer, "scaling", {}):
                continue
            params = {}
            for p in PARAMS:
                attr, _, leaf = p.partition(".")
                holder = getattr(layer, attr, None)
                if holder is not None and adapter_name in holder:
                    value = holder[adapter_name]
                    if leaf or isinstance(value, torch.nn.Module):  # lora_A.weight, DoRA's magnitude layer
                        value = value.weight
                    params[p] = value.detach()
            r = layer.r[adapter_name]
            alpha = layer.scaling[adapter_name] * r  # peft scales by alpha / r (patterns resolved per layer)
            out[kohya_name(comp, name)] = (params, float(alpha), int(r))
    return out


def to_lycoris(tensors: dict[str, tuple[dict[str, torch.Tensor], float, int]]) -> dict[str, torch.Tensor]:
    """The LyCORIS-layout state dict, with each module's update equal to peft's.

    LoKr readers scale by ``alpha / dim`` only when a factor is decomposed (``dim`` = its rank), else by 1;
    peft always scales by ``alpha / r``: with two full factors the scale is folded into ``lokr_w1``.
    """
    sd = {}
    for name, (params, alpha, r) in tensors.items():
        params = dict(params)
        if "lokr_w1" in params and "lokr_w2" in params and alpha != r:
            params["lokr_w1"] = params["lokr_w1"] * (alpha / r)
            alpha = float(r)
        for p, v in params.items():
            if p == "lora_magnitude_vector":
                v = v.reshape(-1, 1)  # LyCORIS/ComfyUI: [out, 1] marks the norm over each output row, as peft's
            sd[f"{name}.{RENAME.get(p, p)}"] = v.detach().to("cpu").contiguous()
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def write_lycoris(tensors: dict[str, tuple[dict[str, torch.Tensor], float, int]], kind: str,
                  path: str | os.PathLike) -> Path:
    """Write ``tensors`` (from :func:`module_tensors`) of adapter type ``kind`` to ``path``, atomically."""
    from safetensors.torch import save

    from .io import atomic_write

    if Path(path).suffix != ".safetensors":
        raise ValueError(f"output {str(path)!r} must end in .safetensors.")
    header = {"format": "pt", "ss_network_module": "lycoris.kohya",
              "ss_network_args": json.dumps({"algo": ALGO[kind], **({"dora_wd": "True"} if kind == "dora" else {})})}
    sd = to_lycoris(tensors)
    data = save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, metadata=header)
    return atomic_write(path, lambda f: f.write(data))


def merged_weight(params: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The base ``weight`` with one module's LyCORIS-layout update applied, as A1111/ComfyUI apply it at strength 1.

    Args:
        params: the module's tensors by LyCORIS name (``lora_down.weight``, ``lokr_w1``, ``alpha``, ...).
        weight: the base layer's ``[out, in]`` weight.
    """
    w, p = weight.float(), {k: v.float() for k, v in params.items()}
    alpha = p.get("alpha")
    if "hada_w1_a" in p:  # LoHa: (w1a w1b) * (w2a w2b), scale alpha / r
        scale = float(alpha) / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return w + scale * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    if any(k.startswith("lokr_") for k in p):  # LoKr: kron(w1, w2), scale alpha / dim of a decomposed factor
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            w1, dim = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        w2 = p.get("lokr_w2")
        if w2 is None:
            w2, dim = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
        return w + scale * torch.kron(w1, w2).reshape(w.shape)
    down, up = p["lora_down.weight"], p["lora_up.weight"]
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    new = w + scale * (up @ down)
    if "dora_scale" in p:  # DoRA: magnitude times the direction, the norm taken over each output row
        new = p["dora_scale"] * new / new.norm(dim=1, keepdim=True)
    return new


def read_lycoris(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """``kohya module name -> {LyCORIS param: tensor}`` of a LyCORIS-layout ``.safetensors`` file."""
    from safetensors.torch import load_file

    from .io import check_safetensors

    check_safetensors(Path(path), "LyCORIS")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, param = key.partition(".")
        if not name.startswith(tuple(PREFIX.values())):
            raise ValueError(f"{path}: key {key!r} is not in the kohya/LyCORIS layout (lora_unet_ / lora_te1_ / "
                             "lora_te2_ module names).")
        modules.setdefault(name, {})[param] = value
    return modules


@torch.no_grad()
def apply_lycoris(path: str | os.PathLike, models: dict[str, torch.nn.Module]) -> int:
    """Bake a LyCORIS-layout file into plain (adapter-free) models' linear weights; returns the modules changed.

    Args:
        path: the file.
        models: ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` without adapters.
    """
    names = {kohya_name(c, n): m for c, model in models.items() if model is not None
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    file = read_lycoris(path)
    for name, params in file.items():
        if name not in names:
            raise ValueError(f"{path}: module {name!r} is not a linear layer of the given base models: the file "
                             "was trained on a different base.")
        layer = names[name]
        layer.weight.copy_(merged_weight(params, layer.weight).to(layer.weight.dtype))
    return len(file)
