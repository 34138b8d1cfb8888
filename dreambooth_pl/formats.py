"""SDXL LoRA files in the two layouts in use: diffusers/peft and kohya (A1111, ComfyUI, sd-scripts).

diffusers/peft: ``unet.<module>.lora_A.weight`` / ``lora_B`` (+ ``text_encoder.`` / ``text_encoder_2.``), alpha in
the safetensors header (``lora_adapter_metadata``, a peft ``LoraConfig``), what ``load_lora_weights`` reads.
kohya: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha`` (``lora_te1_`` /
``lora_te2_`` for the text encoders). Reading kohya uses diffusers' own converter (SGM block names included);
writing kohya uses diffusers' ``convert_state_dict_to_kohya`` with the real alphas put back. Both directions keep
every value exactly; in memory a LoRA is a :class:`~dreambooth_pl.lora_state.LoRA` (lora_state.py).
"""
from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from .lora_state import COMPONENTS, LoRA, LoRAFormatError, check_pairs, check_values, foreign_type, on_disk_name

Format = Literal["diffusers", "kohya"]
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$")
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


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
