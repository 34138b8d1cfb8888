"""Write the trained adapters as a diffusers-format LoRA file when fit ends."""
from __future__ import annotations

import os
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class LoRAExport(L.Callback):
    """Save ``pytorch_lora_weights.safetensors`` (loadable by ``StableDiffusionXLPipeline.load_lora_weights``), and
    with ``model.pivotal`` the new tokens' ``<folder name>_emb.safetensors`` beside it (pivotal.py).

    Args:
        dirpath: output folder (None: the run's log dir, e.g. ``lightning_logs/version_3``).
        filename: file name inside ``dirpath``.
        format: ``diffusers``, ``kohya`` (LoRA: kohya's; DoRA/LoKr/LoHa: LyCORIS's) or ``auto`` (diffusers for
            LoRA/DoRA, LyCORIS for LoKr/LoHa, which diffusers cannot load); checked when fit starts.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "pytorch_lora_weights.safetensors",
                 format: Literal["auto", "diffusers", "kohya"] = "auto"):
        self.dirpath, self.filename, self.format = dirpath, filename, format
        self._out: Optional[str] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from ..adapter.kinds import check_layout

        kind = pl_module.hparams.lora.adapter
        if self.format != "auto":  # refuse now, not after the whole run
            check_layout(kind, self.format, "export.format")

    def path(self, trainer: L.Trainer) -> str:
        return os.path.join(self.dirpath or trainer.log_dir or trainer.default_root_dir, self.filename)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resolved here, where every rank runs: trainer.log_dir broadcasts under DDP, and asked by rank 0 alone in
        # on_train_end it waited forever for the other ranks (the 2-GPU GPU test's hang)
        self._out = self.path(trainer)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:  # a stopped run keeps its checkpoint; the export belongs to a finished run
            return
        out = pl_module.export_lora(self._out or self.path(trainer), self.format)
        rank_zero_info(f"LoRA written to {out}")
        from ..pivotal import export_embeddings

        emb = export_embeddings(pl_module, os.path.dirname(out))  # model.pivotal's tokens, beside the LoRA
        if emb:
            rank_zero_info(f"token embeddings written to {emb} (load both: sample --lora {out})")
