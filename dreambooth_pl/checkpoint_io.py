"""Lightning ``CheckpointIO`` whose local writes go through :func:`dreambooth_pl.io.atomic_write`.

Lightning's own ``_atomic_save`` stages local files in the system temp dir and moves them over, which becomes a
copy (not a rename) across filesystems and is not fsynced; this writes beside the target, fsyncs and renames, so
a crash, kill or full disk mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes local checkpoints atomically (remote URLs: Lightning's).

    Loading is Lightning's ``torch.load``; the CLI checks the file first and passes ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        atomic_write(path, lambda f: torch.save(checkpoint, f), hint="resume with --ckpt_path last")
