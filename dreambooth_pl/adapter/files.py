"""Adapter files of every kind in both layouts: detect the layout, read into an :class:`~.value.Adapter`, write one
(atomically, through io/), or write the adapter live models carry.

Layouts: ``diffusers`` (diffusers_layout.py; LoRA and DoRA, what ``load_lora_weights`` reads) and ``kohya``
(kohya_layout.py; every kind, what A1111, ComfyUI, Forge and sd-scripts read). Which outside readers are exact for
which kind and layout is in docs/merging.md.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from ..io import atomic_write, load_safetensors, parse_json
from .diffusers_layout import METADATA_KEY, from_diffusers, to_diffusers
from .kinds import KINDS, Layout, check_layout
from .kohya_layout import READ_PREFIXES, from_kohya, to_kohya
from . import LORA_FILE  # noqa: F401 - re-exported
from .value import COMPONENTS, Adapter, AdapterFormatError, check_values, from_models, uniform_alpha



def detect_layout(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> Layout:
    """``kohya`` or ``diffusers``; raises :class:`AdapterFormatError` naming the first key that fits neither."""
    if not state_dict:
        raise AdapterFormatError(f"{source}: no tensors, not an adapter file.")
    keys = list(state_dict)
    if keys[0].startswith(READ_PREFIXES):
        layout, ok = "kohya", lambda k: k.startswith(READ_PREFIXES)
    else:
        layout, ok = "diffusers", lambda k: k.split(".", 1)[0] in COMPONENTS
    bad = next((k for k in keys if not ok(k)), None)
    if bad is not None:
        raise AdapterFormatError(
            f"{source}: key {bad!r} fits neither the diffusers layout (keys starting unet. / text_encoder. / "
            "text_encoder_2.) nor the kohya layout (lora_unet_ / lora_te1_ / lora_te2_); "
            f"the file mixes layouts or is not an SDXL adapter (first key {keys[0]!r}).")
    return layout


def resolve(path: str | os.PathLike) -> Path:
    """The adapter file ``path`` names (a run folder: its ``pytorch_lora_weights.safetensors``), checked to exist."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise AdapterFormatError(f"adapter file {str(p)!r} does not exist: give the .safetensors that fit exported "
                                 "(lightning_logs/version_N/pytorch_lora_weights.safetensors).")
    if p.suffix != ".safetensors":
        raise AdapterFormatError(f"{str(p)!r}: adapter files are read from .safetensors only (no pickles).")
    return p


def read_adapter(path: str | os.PathLike, unet_config=None) -> Adapter:
    """Read an adapter ``.safetensors`` file of any kind (or a folder holding ``pytorch_lora_weights.safetensors``),
    either layout.

    Args:
        path: the file.
        unet_config: base UNet config, only needed for kohya files with SGM block names on a non-SDXL layout.
    """
    p = resolve(path)
    state_dict, header = load_safetensors(p, "adapter")  # a pickle renamed .safetensors is refused, never unpickled
    if detect_layout(state_dict, str(p)) == "kohya":
        return check_values(from_kohya(state_dict, unet_config, str(p)), str(p))
    meta = parse_json(header[METADATA_KEY], f"{p} (header {METADATA_KEY})") if METADATA_KEY in header else None
    if meta is not None and not isinstance(meta, dict):
        raise AdapterFormatError(f"{p}: header {METADATA_KEY} is not a JSON object; export the file again.")
    return check_values(from_diffusers(state_dict, meta, str(p)), str(p))


def write_adapter(adapter: Adapter, path: str | os.PathLike, layout: Layout = "diffusers") -> Path:
    """Write ``adapter`` to ``path`` in ``layout``, atomically (:func:`dreambooth_pl.io.atomic_write`).

    Args:
        adapter: the adapter.
        path: output ``.safetensors`` file.
        layout: ``diffusers`` (``load_lora_weights``; LoRA and DoRA) or ``kohya`` (A1111, ComfyUI, sd-scripts).
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFormatError(f"output {str(path)!r} must end in .safetensors.")
    if layout not in ("diffusers", "kohya"):
        raise AdapterFormatError(f"unknown adapter layout {layout!r}; choose diffusers or kohya.")
    check_layout(adapter.kind, layout)
    if layout == "kohya":
        if adapter.kind == "dora":
            warnings.warn(f"{path}: diffusers' load_lora_weights drops dora_scale from the kohya/LyCORIS layout and "
                          "loads this DoRA as a plain LoRA; LyCORIS, A1111, ComfyUI and this project's sample read it "
                          "exactly. For diffusers, write the diffusers layout (format: diffusers).", stacklevel=2)
        tensors, header = to_kohya(adapter), dict(KINDS[adapter.kind].header)
    else:
        tensors, meta = to_diffusers(adapter)
        header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    header["format"] = "pt"
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    return atomic_write(path, lambda f: f.write(data))


def save_adapter(path: str | os.PathLike, kind: str, models: dict[str, torch.nn.Module | None],
                 layout: Literal["auto", "diffusers", "kohya"] = "auto") -> Path:
    """Write the ``default`` adapter of live ``models`` (``{"unet": ..., "text_encoder": ..., ...}``) to ``path``.

    Args:
        path: ``.safetensors`` file (a folder gets ``pytorch_lora_weights.safetensors`` inside).
        kind: the adapter kind the models carry.
        models: component name -> model (None: skipped).
        layout: ``diffusers``, ``kohya`` (LoRA: kohya's; DoRA/LoKr/LoHa: LyCORIS's), or ``auto`` (the kind's first).
    """
    layout = KINDS[kind].layouts[0] if layout == "auto" else layout
    check_layout(kind, layout)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE
    adapter = from_models(models)
    if adapter.kind != kind:
        raise AdapterFormatError(f"the models carry a {KINDS[adapter.kind].title} adapter, not {KINDS[kind].title}.")
    return write_adapter(uniform_alpha(adapter) if layout == "kohya" else adapter, path, layout)
