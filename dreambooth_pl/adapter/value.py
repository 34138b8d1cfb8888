"""An SDXL adapter in memory, of any kind, and its checks: the :class:`Adapter` value (peft naming, one alpha per
module), taken from live models (:func:`from_models`) or read from a file (files.py), and the checks every reader
applies (complete modules, sane values).
"""
from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import torch

from .kinds import KINDS, kind_of

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class AdapterFormatError(ValueError):
    """An adapter file or state dict that cannot be read; the message names the file, the key and the fix."""


@dataclass
class Adapter:
    """An SDXL adapter of kind ``kind`` in peft naming: ``weights['unet.<module>.<param>']`` (``param`` one of
    ``KINDS[kind].params``), ``alphas['unet.<module>']``; module ``m`` is scaled by ``alphas[m] / rank(m)``.
    """

    weights: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-d tensors, dtype kept for kohya round trips
    kind: str = "lora"

    def __post_init__(self):
        for m in self.modules():  # no alpha stored: alpha = rank, scale 1 (the diffusers/peft convention)
            self.alphas.setdefault(m, torch.tensor(float(self.rank(m))))

    def _split(self, key: str) -> tuple[str, str] | None:
        """``(module, param)`` of a weight key, None if no param of this kind ends it."""
        for p in KINDS[self.kind].params:
            if key.endswith("." + p):
                return key[: -len(p) - 1], p
        return None

    def modules(self) -> list[str]:
        """Adapted modules, component-prefixed (``unet.down_blocks.1....to_q``), in file order."""
        return list(dict.fromkeys(s[0] for s in map(self._split, self.weights) if s is not None))

    def params(self, module: str) -> dict[str, torch.Tensor]:
        """One module's tensors by peft parameter name."""
        return {p: self.weights[f"{module}.{p}"] for p in KINDS[self.kind].params if f"{module}.{p}" in self.weights}

    def down(self, module: str) -> torch.Tensor:
        return self.weights[f"{module}.lora_A.weight"]

    def up(self, module: str) -> torch.Tensor:
        return self.weights[f"{module}.lora_B.weight"]

    def rank(self, module: str) -> int:
        return KINDS[self.kind].rank(self.params(module))

    def scale(self, module: str) -> float:
        return float(self.alphas[module]) / self.rank(module)

    def delta(self, module: str) -> torch.Tensor:
        """The weight update in fp32, shaped like the base weight; refused where it depends on the base (DoRA)."""
        kind = KINDS[self.kind]
        if kind.delta is None:
            raise AdapterFormatError(f"a {kind.title} update depends on the base weight it adapts (its magnitude "
                                     "rescales each output row), so it has no base-free form: use --method fuse.")
        return kind.delta(self.params(module), self.scale(module))

    def component(self, name: str) -> dict[str, torch.Tensor]:
        """Weights of one component without its prefix (what ``get_peft_model_state_dict`` returns)."""
        return {k[len(name) + 1:]: v for k, v in self.weights.items() if k.split(".", 1)[0] == name}


def on_disk_name(component: str, name: str) -> str:
    """Text-encoder modules as every tool names them (``text_model.encoder...``): transformers 5's CLIP has no
    ``text_model`` level, so files it writes lack it; diffusers strips the prefix again where the model lacks it."""
    if component != "unet" and name.startswith(("encoder.", "embeddings.", "final_layer_norm.")):
        return "text_model." + name
    return name


def from_models(models: dict[str, torch.nn.Module | None], adapter_name: str = "default") -> Adapter:
    """The adapter ``adapter_name`` carried by live peft models (``{"unet": unet, "text_encoder": te1, ...}``).

    A LoKr layer with no decomposed factor gets its scale folded into ``lokr_w1`` (maths.py says why).

    Args:
        models: component name -> model with peft adapter layers (None or adapter-less: skipped).
        adapter_name: the peft adapter to take.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    weights, alphas, params = {}, {}, tuple(dict.fromkeys(p for k in KINDS.values() for p in k.params))
    for comp, model in models.items():
        for name, layer in (model.named_modules() if model is not None else ()):
            if not isinstance(layer, BaseTunerLayer) or adapter_name not in getattr(layer, "scaling", {}):
                continue
            module, found = f"{comp}.{on_disk_name(comp, name)}", {}
            for p in params:
                attr, _, leaf = p.partition(".")
                holder = getattr(layer, attr, None)
                if holder is not None and adapter_name in holder:
                    value = holder[adapter_name]
                    found[p] = (value.weight if leaf or isinstance(value, torch.nn.Module) else value).detach()
            r = layer.r[adapter_name]
            alpha = float((getattr(layer, "lora_alpha", None) or layer.alpha)[adapter_name])
            if "lokr_w1" in found and "lokr_w2" in found:  # no r in the file's maths: fold s = alpha / r into w1
                found["lokr_w1"] = found["lokr_w1"] * (alpha / r)
                alpha = float(max(found["lokr_w2"].shape))
            weights.update({f"{module}.{p}": v for p, v in found.items()})
            alphas[module] = torch.tensor(alpha)  # per layer: patterns kept
    if not weights:
        raise AdapterFormatError(f"none of {sorted(models)} carries an adapter named {adapter_name!r}.")
    return check_keys(Adapter(weights, alphas, kind_of(weights)), "models")


_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.[\w.]+$")


def check_keys(adapter: Adapter, source: str) -> Adapter:
    """Every key is ``<component>.<module>.<param>`` of the adapter's kind, every module has all of its kind's
    tensors, and LoRA factors agree on the rank."""
    kind = KINDS[adapter.kind]
    for k in adapter.weights:
        if not _KEY.match(k) or adapter._split(k) is None:
            raise AdapterFormatError(f"{source}: key {k!r} is not a {kind.title} weight (expected <module>."
                                     f"{' / .'.join(kind.params)}); the file is damaged or of another kind.")
    for m in adapter.modules():
        have = adapter.params(m)
        if adapter.kind == "lokr":
            missing = [f for f in ("lokr_w1", "lokr_w2") if f not in have and not {f + "_a", f + "_b"} <= set(have)]
        else:
            missing = [p for p in kind.params if p not in have]
        if missing:
            raise AdapterFormatError(f"{source}: module {m!r} has {', '.join(sorted(have))} but no {missing[0]}; "
                                     "the file is truncated.")
        if "lora_A.weight" in have and have["lora_A.weight"].shape[0] != have["lora_B.weight"].shape[1]:
            raise AdapterFormatError(f"{source}: module {m!r} has lora_A rank {have['lora_A.weight'].shape[0]} but "
                                     f"lora_B rank {have['lora_B.weight'].shape[1]}.")
    return adapter


MAX_SCALE = 1024.0  # |alpha / rank| above this is no adapter anyone trained: the images would saturate to black


def check_values(adapter: Adapter, source: str) -> Adapter:
    """Floating-point, 1-D (DoRA magnitude), 2-D (linear) or 4-D (LoRA conv) tensors, finite weights and a sane
    alpha, else an error naming the tensor: NaN, inf or an absurd alpha would otherwise give black images and a
    successful exit."""
    for k, v in adapter.weights.items():
        if not v.is_floating_point():
            raise AdapterFormatError(f"{source}: tensor {k!r} has dtype {v.dtype}; adapter weights are floating "
                                     "point (quantised files are not supported): export it again in float16/32.")
        if v.dim() not in ((1,) if k.endswith("magnitude_vector") else (2, 4)):
            raise AdapterFormatError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}; adapter factors are 2-D "
                                     "(linear) or 4-D (conv), a DoRA magnitude 1-D.")
        if not torch.isfinite(v).all():
            raise AdapterFormatError(f"{source}: tensor {k!r} holds NaN or inf values: the adapter is broken (a "
                                     "diverged training run?); use an earlier checkpoint.")
    for m in adapter.modules():
        if "lora_A.weight" in adapter.params(m) and adapter.down(m).dim() != adapter.up(m).dim():
            raise AdapterFormatError(f"{source}: module {m!r} has a {adapter.down(m).dim()}-D lora_A but a "
                                     f"{adapter.up(m).dim()}-D lora_B; the file is damaged.")
        alpha = float(adapter.alphas[m])
        if not math.isfinite(alpha) or abs(alpha / adapter.rank(m)) > MAX_SCALE:
            raise AdapterFormatError(f"{source}: module {m!r} has alpha {alpha:g} for rank {adapter.rank(m)} "
                                     f"(scale alpha/rank beyond ±{MAX_SCALE:g}): the file's alpha is broken.")
    return adapter


def uniform_alpha(adapter: Adapter) -> Adapter:
    """The same LoRA/DoRA with one alpha everywhere (the most common), each other module's ratio folded into B.

    diffusers (0.42) loads a kohya file's alphas correctly only when the UNet's are all equal: its converted
    ``alpha_pattern`` keys match no module and are dropped. A1111 and ComfyUI read per-module alphas either way;
    LoKr and LoHa (which diffusers does not read) are returned as they are.
    """
    if adapter.kind not in ("lora", "dora") or len({float(a) for a in adapter.alphas.values()}) <= 1:
        return adapter
    common = collections.Counter(float(a) for a in adapter.alphas.values()).most_common(1)[0][0]
    weights, alphas = dict(adapter.weights), {}
    for m in adapter.modules():
        alphas[m] = torch.tensor(common, dtype=adapter.alphas[m].dtype)
        if float(adapter.alphas[m]) != common:  # alpha_m / r * B == common / r * (B * alpha_m / common)
            up = adapter.up(m)
            weights[f"{m}.lora_B.weight"] = (up.float() * (float(adapter.alphas[m]) / common)).to(up.dtype)
    return Adapter(weights, alphas, adapter.kind)
