"""An SDXL LoRA in memory and its checks: the :class:`LoRA` value (peft naming, one alpha per module), taken from
live models or read by formats.py, and the checks every reader applies (paired keys, sane values, a fit to the base).
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.[\w.]+\.lora_[AB]\.weight$")


def foreign_type(key: str) -> str:
    """The adapter type a non-LoRA key belongs to, for messages (``DoRA``, ``LoKr``, ``LoHa`` or a generic name)."""
    if "magnitude_vector" in key or "dora_scale" in key:
        return "DoRA"
    return "LoKr" if "lokr_" in key else "LoHa" if "hada_" in key else "non-LoRA (e.g. bias-trained)"


class LoRAFormatError(ValueError):
    """A LoRA file or state dict that cannot be read; the message names the file, the key and the fix."""


@dataclass
class LoRA:
    """An SDXL LoRA in peft naming: ``weights['unet.<module>.lora_A.weight']``, ``alphas['unet.<module>']``.

    Module ``m`` adds ``alphas[m] / rank(m) * lora_B @ lora_A`` to the base weight (Hu et al. 2021, eq. 3).
    """

    weights: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d tensors, dtype kept for kohya round trips

    def __post_init__(self):
        for m in self.modules():  # no alpha stored: alpha = rank, scale 1 (the diffusers/peft convention)
            self.alphas.setdefault(m, torch.tensor(float(self.rank(m))))

    def modules(self) -> list[str]:
        """Adapted modules, component-prefixed (``unet.down_blocks.1....to_q``), in file order."""
        return [k[: -len(".lora_A.weight")] for k in self.weights if k.endswith(".lora_A.weight")]

    def down(self, module: str) -> torch.Tensor:
        return self.weights[f"{module}.lora_A.weight"]

    def up(self, module: str) -> torch.Tensor:
        return self.weights[f"{module}.lora_B.weight"]

    def rank(self, module: str) -> int:
        return self.down(module).shape[0]

    def scale(self, module: str) -> float:
        return float(self.alphas[module]) / self.rank(module)

    def delta(self, module: str) -> torch.Tensor:
        """The weight update ``alpha / r * B A`` in fp32, shaped like the base weight (linear or conv)."""
        a, b = self.down(module).float(), self.up(module).float()
        d = self.scale(module) * (b.flatten(1) @ a.flatten(1))
        return d.reshape(b.shape[0], *a.shape[1:]) if a.dim() == 4 else d

    def component(self, name: str) -> dict[str, torch.Tensor]:
        """Weights of one component without its prefix (what ``get_peft_model_state_dict`` returns)."""
        return {k[len(name) + 1:]: v for k, v in self.weights.items() if k.split(".", 1)[0] == name}


def from_models(models: dict[str, torch.nn.Module | None], adapter_name: str = "default") -> LoRA:
    """The adapter ``adapter_name`` carried by live models (``{"unet": unet, "text_encoder": te1, ...}``).

    Args:
        models: component name -> model with peft LoRA layers (None or adapter-less: skipped).
        adapter_name: the peft adapter to take.
    """
    from peft.tuners.lora import LoraLayer

    weights, alphas = {}, {}
    for comp, model in models.items():
        for name, layer in (model.named_modules() if model is not None else ()):
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
                module = f"{comp}.{on_disk_name(comp, name)}"
                weights[f"{module}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
                weights[f"{module}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
                alphas[module] = torch.tensor(float(layer.lora_alpha[adapter_name]))  # per layer: patterns kept
    if not weights:
        raise LoRAFormatError(f"none of {sorted(models)} carries a LoRA adapter named {adapter_name!r}.")
    return check_pairs(LoRA(weights, alphas), "models")


def on_disk_name(component: str, name: str) -> str:
    """Text-encoder modules as every tool names them (``text_model.encoder...``): transformers 5's CLIP has no
    ``text_model`` level, so files it writes lack it; diffusers strips the prefix again where the model lacks it."""
    if component != "unet" and name.startswith(("encoder.", "embeddings.", "final_layer_norm.")):
        return "text_model." + name
    return name


def check_pairs(lora: LoRA, source: str) -> LoRA:
    """Every ``lora_A`` has its ``lora_B`` with a matching rank, and every key is a LoRA weight."""
    bad = next((k for k in lora.weights if not _PEFT_KEY.match(k)), None)
    if bad is not None:
        raise LoRAFormatError(f"{source}: key {bad!r} is a {foreign_type(bad)} weight, not a LoRA one (expected "
                              "<module>.lora_A.weight or .lora_B.weight): merging, converting and sampling read "
                              "plain LoRA files only; load DoRA/LoKr/LoHa files in diffusers, A1111 or ComfyUI.")
    for k in lora.weights:
        other = k.replace(".lora_A.", ".lora_B.") if ".lora_A." in k else k.replace(".lora_B.", ".lora_A.")
        if other not in lora.weights:
            raise LoRAFormatError(f"{source}: key {k!r} has no partner {other!r}; the file is truncated.")
    for m in lora.modules():
        if lora.down(m).shape[0] != lora.up(m).shape[1]:
            raise LoRAFormatError(f"{source}: module {m!r} has lora_A rank {lora.down(m).shape[0]} but lora_B "
                                  f"rank {lora.up(m).shape[1]}.")
    return lora


MAX_SCALE = 1024.0  # |alpha / rank| above this is no LoRA anyone trained: the images would saturate to black


def check_values(lora: LoRA, source: str) -> LoRA:
    """Floating-point, 2-D (linear) or 4-D (conv) factors, finite weights and a sane alpha, else an error naming
    the tensor: NaN, inf or an absurd alpha would otherwise give black images and a successful exit."""
    for k, v in lora.weights.items():
        if not v.is_floating_point():
            raise LoRAFormatError(f"{source}: tensor {k!r} has dtype {v.dtype}; LoRA weights are floating point "
                                  "(quantised files are not supported): export it again in float16/32.")
        if v.dim() not in (2, 4):
            raise LoRAFormatError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}; LoRA factors are 2-D "
                                  "(linear) or 4-D (conv).")
        if not torch.isfinite(v).all():
            raise LoRAFormatError(f"{source}: tensor {k!r} holds NaN or inf values: the LoRA is broken (a "
                                  "diverged training run?); use an earlier checkpoint.")
    for m in lora.modules():
        if lora.down(m).dim() != lora.up(m).dim():
            raise LoRAFormatError(f"{source}: module {m!r} has a {lora.down(m).dim()}-D lora_A but a "
                                  f"{lora.up(m).dim()}-D lora_B; the file is damaged.")
        alpha = float(lora.alphas[m])
        if not math.isfinite(alpha) or abs(alpha / lora.rank(m)) > MAX_SCALE:
            raise LoRAFormatError(f"{source}: module {m!r} has alpha {alpha:g} for rank {lora.rank(m)} (scale "
                                  f"alpha/rank beyond ±{MAX_SCALE:g}): the file's alpha is broken.")
    return lora


def uniform_alpha(lora: LoRA) -> LoRA:
    """The same adapter with one alpha everywhere (the most common), each other module's ratio folded into B.

    diffusers (0.42) loads a kohya file's alphas correctly only when the UNet's are all equal: its converted
    ``alpha_pattern`` keys match no module and are dropped. A1111 and ComfyUI read per-module alphas either way.
    """
    if len({float(a) for a in lora.alphas.values()}) <= 1:
        return lora
    common = collections.Counter(float(a) for a in lora.alphas.values()).most_common(1)[0][0]
    weights, alphas = dict(lora.weights), {}
    for m in lora.modules():
        alphas[m] = torch.tensor(common, dtype=lora.alphas[m].dtype)
        if float(lora.alphas[m]) != common:  # alpha_m / r * B == common / r * (B * alpha_m / common)
            up = lora.up(m)
            weights[f"{m}.lora_B.weight"] = (up.float() * (float(lora.alphas[m]) / common)).to(up.dtype)
    return LoRA(weights, alphas)


def base_skeleton(base: str) -> dict[str, torch.nn.Module]:
    """UNet and text encoders of ``base`` built on the meta device: module names and shapes, no weights loaded.

    Args:
        base: SDXL pipeline folder or hub id.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl import resolve_base

    root = resolve_base(base)
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root, subfolder="text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(root, subfolder="text_encoder_2"))}


def check_base(lora: LoRA, models: dict[str, torch.nn.Module], source: str = "LoRA") -> None:
    """Every adapted module exists in the base with matching in/out sizes, else an error naming the key.

    Args:
        lora: the adapter.
        models: ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}`` of the base it will be applied to.
        source: name for error messages.
    """
    found = {c: dict(m.named_modules()) for c, m in models.items() if m is not None}
    for module in lora.modules():
        comp, name = module.split(".", 1)
        layer = found.get(comp, {}).get(name, found.get(comp, {}).get(name.removeprefix("text_model.")))
        layer = getattr(layer, "base_layer", layer)  # the base may already carry a peft adapter
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise LoRAFormatError(f"{source}: key {module}.lora_A.weight adapts {name!r}, which the base's {comp} "
                                  "does not have: the LoRA was trained on a different base model.")
        if lora.down(module).dim() != weight.dim():
            raise LoRAFormatError(f"{source}: key {module}.lora_A.weight is {lora.down(module).dim()}-D but the "
                                  f"base's {name} weight is {weight.dim()}-D: the file is damaged or for another base.")
        want = (weight.shape[0], weight.shape[1])
        got = (lora.up(module).shape[0], lora.down(module).shape[1])
        if want != got:
            raise LoRAFormatError(f"{source}: key {module}.lora_A.weight expects a layer of (out, in) = {got} but "
                                  f"the base's {name} is {want}: the LoRA was trained on a different base model.")
