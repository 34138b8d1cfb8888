"""``python -m dreambooth_pl export --source X --out Y.safetensors --format diffusers|kohya``.

The source is a Lightning checkpoint of :class:`~dreambooth_pl.module.DreamBoothLoRA` (read with
``weights_only=True``: it holds only the adapters and the hyper-parameters) or a LoRA file in either layout.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import torch

from ..formats import Format, read_lora, write_lora
from ..lora_state import (COMPONENTS, LoRA, LoRAFormatError, base_skeleton, check_base, check_pairs, check_values,
                          on_disk_name, uniform_alpha)
from ..io import load_checkpoint
from ..moved_keys import nest_hparams
from ..pivotal import PivotalSettings
from ..sdxl import DTYPES
from ..token_files import ROWS_KEY

_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def exported_state(ckpt: dict, ema: dict) -> dict:
    """The weights a checkpoint's run exports: its EMA (``ema.decay`` with ``ema.export``) or its state_dict."""
    if ema.get("decay") is not None and ema.get("export", True) and "ema" in ckpt:
        return ckpt["ema"]["shadow"]
    return ckpt["state_dict"]


def read_checkpoint(path: str, adapter_name: str = "default") -> LoRA:
    """The adapters of a DreamBoothLoRA Lightning checkpoint; alpha from its ``lora.alpha`` (None: the rank).

    Args:
        path: ``.ckpt`` written by the ``checkpoint`` callback (or ``last.ckpt``).
        adapter_name: the peft adapter name inside the checkpoint.
    """
    ckpt = load_checkpoint(path)
    if "state_dict" not in ckpt:
        raise LoRAFormatError(f"{path}: no 'state_dict' entry, not a Lightning checkpoint.")
    hp = nest_hparams(ckpt.get("hyper_parameters") or {})  # grouped, or flat from before settings.py
    adapter, ema = hp.get("lora", {}), hp.get("ema", {})
    if adapter.get("adapter", "lora") != "lora":
        raise LoRAFormatError(f"{path}: trained with model.lora.adapter={adapter['adapter']}; export converts LoRA "
                              "checkpoints only; the fit writes its adapter file when it ends, in the layout "
                              "export.format picks (diffusers or kohya/LyCORIS).")
    weights, state = {}, exported_state(ckpt, ema)
    for key, value in state.items():
        if key.endswith(ROWS_KEY):  # model.pivotal's token rows: export() writes them beside the LoRA
            continue
        m = _ADAPTER_KEY.match(key)
        comp = key.split(".", 1)[0]
        if not m or comp not in COMPONENTS or m["adapter"] != adapter_name:
            raise LoRAFormatError(f"{path}: state_dict key {key!r} is not a LoRA weight of adapter "
                                  f"{adapter_name!r} on {'/'.join(COMPONENTS)}; was it written by this project?")
        module = on_disk_name(comp, m["module"].split(".", 1)[1])
        weights[f"{comp}.{module}.lora_{m['ab']}.weight"] = value
    if not weights:
        raise LoRAFormatError(f"{path}: the checkpoint holds no LoRA weights.")
    lora = LoRA(weights)
    alpha = adapter.get("alpha") or adapter.get("rank")
    if alpha is not None:  # the module trains one LoraConfig per component: one alpha everywhere
        lora.alphas = {mod: torch.tensor(float(alpha)) for mod in lora.modules()}
    return check_values(check_pairs(lora, path), path)


def export(source: str, out: str, format: Format = "diffusers",
           dtype: Literal["keep", "float32", "float16", "bfloat16"] = "keep", base: Optional[str] = None) -> str:
    """Write a LoRA file in the diffusers or kohya layout from a Lightning checkpoint or another LoRA file; a
    checkpoint of a pivotal-tuning run also gives its token embeddings, ``<out folder name>_emb.safetensors``.

    Args:
        source: ``.ckpt`` of a fit, or a LoRA ``.safetensors`` (diffusers or kohya layout).
        out: output ``.safetensors`` (written atomically).
        format: ``diffusers`` (StableDiffusionXLPipeline.load_lora_weights) or ``kohya`` (A1111, ComfyUI, Forge).
        dtype: storage dtype of the weights (``keep``: as in the source).
        base: optional base pipeline to check the adapters fit (module names and sizes).
    """
    models = base_skeleton(base) if base else None
    if Path(source).suffix == ".ckpt":
        lora = read_checkpoint(source)
    else:
        lora = read_lora(source, models["unet"].config if models else None)
    if models:
        check_base(lora, models, source)
    if dtype != "keep":
        lora.weights = {k: v.to(DTYPES[dtype]) for k, v in lora.weights.items()}
    written = str(write_lora(uniform_alpha(lora) if format == "kohya" else lora, out, format))
    if Path(source).suffix == ".ckpt":
        _export_embeddings(source, out)
    return written


def _export_embeddings(source: str, out: str) -> None:
    """The token rows of a ``model.pivotal`` checkpoint (its EMA when the run exports EMA), beside ``out``."""
    from ..token_files import embeddings_path, from_checkpoint, write_embeddings

    ckpt = load_checkpoint(source)
    hp = nest_hparams(ckpt.get("hyper_parameters") or {})
    rows = from_checkpoint(exported_state(ckpt, hp.get("ema", {})))
    if rows and hp.get("pivotal"):
        settings = PivotalSettings(**hp["pivotal"])
        write_embeddings(embeddings_path(Path(out).parent), rows, settings.identifier, settings.tokens)
