"""SDXL LoRA files in the two layouts in use: diffusers/peft and kohya (A1111, ComfyUI, sd-scripts).

diffusers/peft: ``unet.<module>.lora_A.weight`` / ``lora_B`` (+ ``text_encoder.`` / ``text_encoder_2.``), alpha in
the safetensors header (``lora_adapter_metadata``, a peft ``LoraConfig``), what ``load_lora_weights`` reads.
kohya: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha`` (``lora_te1_`` /
``lora_te2_`` for the text encoders). Reading kohya uses diffusers' own converter (SGM block names included);
writing kohya uses diffusers' ``convert_state_dict_to_kohya`` with the real alphas put back. Both directions keep
every value exactly; in memory a LoRA is a :class:`LoRA` (peft naming, one alpha per module).
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

Format = Literal["diffusers", "kohya"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.[\w.]+\.lora_[AB]\.weight$")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


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


def detect_format(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> Format:
    """``kohya`` or ``diffusers``; raises :class:`LoRAFormatError` naming the first key that fits neither."""
    if not state_dict:
        raise LoRAFormatError(f"{source}: no tensors, not a LoRA file.")
    keys = list(state_dict)
    if keys[0].startswith(tuple(KOHYA_PREFIXES)):
        fmt, ok = "kohya", lambda k: k.startswith(tuple(KOHYA_PREFIXES))
    else:
        fmt, ok = "diffusers", lambda k: k.split(".", 1)[0] in COMPONENTS
    bad = next((k for k in keys if not ok(k)), None)
    if bad is not None:
        raise LoRAFormatError(
            f"{source}: key {bad!r} fits neither the diffusers layout (keys starting unet. / text_encoder. / "
            "text_encoder_2.) nor the kohya layout (lora_unet_ / lora_te1_ / lora_te2_); "
            f"the file mixes layouts or is not an SDXL LoRA (first key {keys[0]!r}).")
    return fmt


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


def on_disk_name(component: str, name: str) -> str:
    """Text-encoder modules as every tool names them (``text_model.encoder...``): transformers 5's CLIP has no
    ``text_model`` level, so files it writes lack it; diffusers strips the prefix again where the model lacks it."""
    if component != "unet" and name.startswith(("encoder.", "embeddings.", "final_layer_norm.")):
        return "text_model." + name
    return name


def _alpha_from_config(cfg: dict, module: str, rank: int) -> float:
    """The alpha peft gives ``module`` under LoraConfig ``cfg`` (``alpha_pattern`` first, then ``lora_alpha``)."""
    from peft.utils.other import get_pattern_key

    pattern = cfg.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module) if pattern else None
    if key in pattern:
        return float(pattern[key])
    return float(cfg.get("lora_alpha") or rank)


def from_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict | None = None,
                   source: str = "state dict") -> LoRA:
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
        weights.update({f"{comp}.{on_disk_name(comp, k)}": v for k, v in part.items()})
    lora = check_pairs(LoRA(weights), source)
    for m in lora.modules():
        comp, name = m.split(".", 1)
        cfg = {k[len(comp) + 1:]: v for k, v in (metadata or {}).items() if k.split(".", 1)[0] == comp}
        if cfg:
            lora.alphas[m] = torch.tensor(_alpha_from_config(cfg, name.removeprefix("text_model."), lora.rank(m)))
    return lora


def from_kohya(state_dict: dict[str, torch.Tensor], unet_config=None, source: str = "state dict") -> LoRA:
    """Read a kohya-layout state dict (diffusers or SGM block names) through diffusers' converter.

    Args:
        state_dict: ``lora_unet_*`` / ``lora_te1_*`` / ``lora_te2_*`` keys with ``.alpha``.
        unet_config: the base UNet's config, needed only for SGM names (``input_blocks_4_1``); default SDXL's.
        source: file name for error messages.
    """
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    for k in state_dict:
        if not _KOHYA_KEY.match(k):
            raise LoRAFormatError(f"{source}: kohya key {k!r} is not <lora_unet_|lora_te1_|lora_te2_>NAME."
                                  f"<lora_down.weight|lora_up.weight|alpha> but a {foreign_type(k)} weight: merging, "
                                  "converting and sampling read plain LoRA files only.")
    sd = _maybe_map_sgm_blocks_to_diffusers(dict(state_dict), unet_config or SimpleNamespace(layers_per_block=2))
    weights, alphas = {}, {}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key.split(".")[0]
        if f"{name}.lora_up.weight" not in sd:
            raise LoRAFormatError(f"{source}: key {key!r} has no partner {name}.lora_up.weight; the file is truncated.")
        pair = {key: sd[key], f"{name}.lora_up.weight": sd[f"{name}.lora_up.weight"]}
        try:  # one module at a time, so each kohya name maps to exactly one peft module (and its alpha)
            converted = from_diffusers(_convert_non_diffusers_lora_to_diffusers(pair)[0], source=source)
        except (ValueError, KeyError) as e:
            raise LoRAFormatError(f"{source}: cannot map kohya key {key!r} to a diffusers module ({e}).") from None
        (module,) = converted.modules()
        weights.update(converted.weights)
        alphas[module] = sd.get(f"{name}.alpha", torch.tensor(float(converted.rank(module))))
    orphans = sorted({k.split(".")[0] for k in sd} - {k.split(".")[0] for k in sd if k.endswith("lora_down.weight")})
    if orphans:
        raise LoRAFormatError(f"{source}: key {orphans[0]!r} has .alpha or lora_up but no lora_down.weight.")
    return check_pairs(LoRA(weights, alphas), source)


def read_lora(path: str | os.PathLike, unet_config=None) -> LoRA:
    """Read a LoRA ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``), either layout.

    Args:
        path: the file.
        unet_config: base UNet config, only needed for kohya files with SGM block names on a non-SDXL layout.
    """
    from .io import load_safetensors, parse_json
    from .lora import LORA_FILE

    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILE
    if not p.exists():
        raise LoRAFormatError(f"LoRA file {str(p)!r} does not exist.")
    if p.suffix != ".safetensors":
        raise LoRAFormatError(f"{str(p)!r}: LoRA files are read from .safetensors only (no pickles).")
    state_dict, header = load_safetensors(p, "LoRA")  # a pickle renamed .safetensors is refused, never unpickled
    fmt = detect_format(state_dict, str(p))
    if fmt == "kohya":
        return check_values(from_kohya(state_dict, unet_config, str(p)), str(p))
    meta = parse_json(header[METADATA_KEY], f"{p} (header {METADATA_KEY})") if METADATA_KEY in header else None
    if meta is not None and not isinstance(meta, dict):
        raise LoRAFormatError(f"{p}: header {METADATA_KEY} is not a JSON object; export the file again.")
    return check_values(from_diffusers(state_dict, meta, str(p)), str(p))


def lora_config_dict(lora: LoRA, component: str) -> dict:
    """The peft ``LoraConfig`` fields that reproduce ``component``'s ranks and alphas (diffusers' metadata).

    Names drop ``text_model.``: peft matches them as suffixes, so they fit CLIP with and without that level.
    """
    mods = [m for m in lora.modules() if m.split(".", 1)[0] == component]
    ranks = {m.split(".", 1)[1].removeprefix("text_model."): lora.rank(m) for m in mods}
    alphas = {m.split(".", 1)[1].removeprefix("text_model."): float(lora.alphas[m]) for m in mods}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
            "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha}}


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


def to_kohya(lora: LoRA) -> dict[str, torch.Tensor]:
    """The kohya state dict: diffusers' ``convert_state_dict_to_kohya`` with each module's real alpha."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    out = {}
    for module in lora.modules():  # one module at a time: the converter's alpha (= rank) is replaced by ours
        pair = {f"{module}.lora_A.weight": lora.down(module), f"{module}.lora_B.weight": lora.up(module)}
        converted = convert_state_dict_to_kohya(pair)
        (alpha_key,) = [k for k in converted if k.endswith(".alpha")]
        converted[alpha_key] = lora.alphas[module]
        out.update(converted)
    return out


def write_lora(lora: LoRA, path: str | os.PathLike, format: Format = "diffusers") -> Path:
    """Write ``lora`` to ``path`` in ``format``, atomically (:func:`dreambooth_pl.io.atomic_write`).

    Args:
        lora: the adapter.
        path: output ``.safetensors`` file.
        format: ``diffusers`` (``load_lora_weights``) or ``kohya`` (A1111, ComfyUI, sd-scripts).
    """
    from safetensors.torch import save

    from .io import atomic_write

    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"output {str(path)!r} must end in .safetensors.")
    if format == "kohya":
        tensors, header = to_kohya(lora), {"ss_network_module": "networks.lora"}
    elif format == "diffusers":
        tensors = {k: v for k, v in lora.weights.items()}
        meta = {f"{c}.{k}": v for c in COMPONENTS if lora.component(c) for k, v in lora_config_dict(lora, c).items()}
        header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    else:
        raise LoRAFormatError(f"unknown LoRA format {format!r}; choose diffusers or kohya.")
    header["format"] = "pt"
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    return atomic_write(path, lambda f: f.write(data))


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
