"""``python -m dreambooth_pl export --source X --out Y.safetensors --format auto|diffusers|kohya``.

The source is a Lightning checkpoint of :class:`~dreambooth_pl.module.DreamBoothLoRA` (read with
``weights_only=True``: it holds only the adapters and the hyper-parameters) or an adapter file in either layout, of
any kind (LoRA, DoRA, LoKr, LoHa). Which outside readers load which kind and layout exactly: docs/merging.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from ..adapter.base import base_skeleton, check_base
from ..adapter.checkpoint import exported_state, read_checkpoint
from ..adapter.files import read_adapter, write_adapter
from ..adapter.kinds import KINDS
from ..adapter.value import uniform_alpha
from ..io import check_output_file, load_checkpoint
from ..moved_keys import nest_hparams
from ..pivotal import PivotalSettings
from ..sdxl import DTYPES


def export(source: str, out: str, format: Literal["auto", "diffusers", "kohya"] = "auto",
           dtype: Literal["keep", "float32", "float16", "bfloat16"] = "keep", base: Optional[str] = None) -> str:
    """Write an adapter file in the diffusers or kohya layout from a Lightning checkpoint or another adapter file; a
    checkpoint of a pivotal-tuning run also gives its token embeddings, ``<out folder name>_emb.safetensors``.

    Args:
        source: ``.ckpt`` of a fit, or an adapter ``.safetensors`` (diffusers or kohya layout).
        out: output ``.safetensors`` (written atomically).
        format: ``diffusers`` (StableDiffusionXLPipeline.load_lora_weights; LoRA and DoRA), ``kohya`` (A1111,
            ComfyUI, Forge; LyCORIS's layout for DoRA, LoKr and LoHa) or ``auto`` (diffusers for LoRA/DoRA, kohya
            for LoKr/LoHa). diffusers reads a DoRA exactly only in the diffusers layout (docs/merging.md).
        dtype: storage dtype of the weights (``keep``: as in the source).
        base: optional base pipeline to check the adapters fit (module names and sizes).
    """
    check_output_file(out, "--out", [source])  # before any work; also removes a killed export's temp file
    models = base_skeleton(base) if base else None
    if Path(source).suffix == ".ckpt":
        adapter = read_checkpoint(source)
    else:
        adapter = read_adapter(source, models["unet"].config if models else None)
    if models:
        check_base(adapter, models, source)
    if dtype != "keep":
        adapter.weights = {k: v.to(DTYPES[dtype]) for k, v in adapter.weights.items()}
    layout = KINDS[adapter.kind].layouts[0] if format == "auto" else format
    written = str(write_adapter(uniform_alpha(adapter) if layout == "kohya" else adapter, out, layout))
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
