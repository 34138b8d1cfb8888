"""LightningCLI for fit/validate/test/predict: linked arguments, a resumable saved config, safe checkpoint loading."""
from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks.export import LoRAExport
from .callbacks.fault_tolerance import FaultTolerance
from .checkpoint_io import check_writable
from .data.datamodule import DreamBoothDataModule
from .module import DreamBoothLoRA


def _seed(value) -> int:
    """``seed_everything`` may be true (pick one at random); data order and noise then use seed 0."""
    return 0 if isinstance(value, bool) else int(value)


class VersionedSaveConfig(SaveConfigCallback):
    """Save ``config.yaml`` with the logger's version filled in, so ``fit --config <it> --ckpt_path last``
    reopens the same run folder and finds its ``checkpoints/last.ckpt``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        logger = self.config.get("trainer", {}).get("logger") if hasattr(self.config, "get") else None
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and trainer.logger is not None and hasattr(init_args, "version"):
            init_args.version = trainer.logger.version
        super().setup(trainer, pl_module, stage)


class DreamBoothCLI(LightningCLI):
    """``python -m dreambooth_pl fit --config configs/<x>.yaml``; ``--print_config`` shows every value."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs):
        trainer_defaults = {
            "max_steps": 1000,
            "precision": "16-mixed",
            "log_every_n_steps": 10,
            # checkpoints written beside the target and renamed: a kill or full disk leaves the last one whole
            "plugins": [{"class_path": "dreambooth_pl.checkpoint_io.AtomicCheckpointIO"}],
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": ".", "name": "lightning_logs"}},
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(DreamBoothLoRA, DreamBoothDataModule, save_config_callback=VersionedSaveConfig,
                         save_config_kwargs={"overwrite": True}, trainer_defaults=trainer_defaults,
                         seed_everything_default=0, auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 250,
                             "checkpoint.save_top_k": 0, "checkpoint.save_weights_only": False})
        parser.add_lightning_class_args(LoRAExport, "export")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")  # lr-AdamW/pg1 in TensorBoard
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(FaultTolerance, "faults")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed)
        parser.link_arguments("model.base_model", "data.base_model")  # data.generate_class_images draws with it
        parser.link_arguments("model.vae_model", "data.vae_model")

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to this run's ``last.ckpt`` and load checkpoints with ``weights_only``."""
        self._check_outputs()
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("weights_only") is None and "weights_only" in self._subcommand_method_arguments["fit"]:
            kwargs["weights_only"] = True
        if kwargs.get("ckpt_path") == "last":
            log_dir = self.trainer.log_dir or self.trainer.default_root_dir
            path = os.path.join(log_dir, "checkpoints", "last.ckpt")
            if not os.path.exists(path):
                raise SystemExit(f"--ckpt_path last: no checkpoint at {path}. Resume with the run's own config "
                                 "(lightning_logs/version_N/config.yaml, which pins the version), or give the "
                                 "checkpoint file itself.")
            kwargs["ckpt_path"] = path
        elif kwargs.get("ckpt_path") and not os.path.exists(kwargs["ckpt_path"]):
            raise SystemExit(f"--ckpt_path {kwargs['ckpt_path']!r} does not exist.")

    def _check_outputs(self) -> None:
        """Every folder this run will write must be writable now, not after the models have loaded."""
        trainer = self.trainer
        dirs = {"trainer.default_root_dir": trainer.default_root_dir}
        if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
            dirs["trainer.logger.init_args.save_dir"] = trainer.logger.save_dir
        for cb in trainer.callbacks:
            for section, kind in (("checkpoint", ModelCheckpoint), ("export", LoRAExport)):
                if isinstance(cb, kind) and cb.dirpath:
                    dirs[f"{section}.dirpath"] = cb.dirpath
        check_writable(dirs)
