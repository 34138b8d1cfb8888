"""LightningCLI for fit/validate/test/predict: linked arguments, a resumable saved config, safe checkpoint loading."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callbacks.export import LoRAExport
from .callbacks.fault_tolerance import FaultTolerance
from .io import check_output_dir, check_writable, clean_stale_temps, load_checkpoint, write_text
from . import config_guard
from .moved_keys import check_moved_keys, nest_hparams
from .console import quiet_third_party
from .data.datamodule import DreamBoothDataModule
from .module import DreamBoothLoRA
from .runs import RunDir, place_run


def _get(section, key: str):
    """``key`` (dotted, e.g. ``priors.enabled``) of a parsed section: a Namespace, or a group already built."""
    node = section
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            return None
    return node


def _seed(value) -> int:
    """``seed_everything`` may be true (pick one at random); data order and noise then use seed 0."""
    return 0 if isinstance(value, bool) else int(value)


class FitParser(LightningArgumentParser):
    """Fit's parser. Its YAML dumps (``--print_config`` and each run's config.yaml) end with the aspect-bucket
    table as comments when ``data.crops.aspect_buckets`` is on: the table is derived from ``data.resolution``,
    ``data.crops.bucket_step`` and ``data.crops.bucket_max_ratio``, and jsonargparse dumps only the values it
    parses."""

    def __init__(self, *args, **kwargs):
        # no abbreviated options: "--conf FILE" would load a config that the class-path and moved-key checks,
        # which run before parsing, never saw
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        guard = config_guard.current()
        if guard is not None:
            guard.check()  # a refused import: say so by key, not inside a page of usage and union attempts
        super().error(message, ex)

    def dump(self, cfg, *args, **kwargs) -> str:
        text = super().dump(cfg, *args, **kwargs)
        try:
            return text + self._bucket_comments(cfg, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a comment must never break a dump (or a DDP rank's config save)
            return text + f"# (aspect-bucket table not shown: {err})\n"

    def _bucket_comments(self, cfg, *args, **kwargs) -> str:
        data = cfg.get("data") if hasattr(cfg, "get") else None
        fmt = kwargs.get("format", args[0] if args else "parser_mode")
        yaml = fmt == "yaml" or (fmt == "parser_mode" and self.parser_mode in ("yaml", "omegaconf"))
        if not yaml or data is None or not _get(data, "crops.aspect_buckets"):  # comments would break JSON
            return ""
        from .data.buckets import bucket_report

        data = data.as_dict() if hasattr(data, "as_dict") else dict(data)
        try:
            with warnings.catch_warnings():  # the photos' load notes: the data module has shown them once already
                warnings.simplefilter("ignore")
                report = bucket_report(data)
        except (OSError, ValueError) as err:  # photos missing or unreadable: fit will say so; show the table
            report = bucket_report(data, count=False) + f"\n(photos not counted: {err})"
        return "".join(f"# {line}\n" for line in report.splitlines())


class VersionedSaveConfig(SaveConfigCallback):
    """Save ``config.yaml`` with the logger's version filled in, so ``fit --config <it> --ckpt_path last``
    reopens the same run folder and finds its ``checkpoints/last.ckpt``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        logger = self.config.get("trainer", {}).get("logger") if hasattr(self.config, "get") else None
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and trainer.logger is not None and hasattr(init_args, "version"):
            init_args.version = trainer.logger.version
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective call: every rank asks
        if trainer.is_global_zero:  # atomic: a kill or full disk leaves the previous config.yaml or the whole new one
            write_text(os.path.join(log_dir, self.config_filename), self.parser.dump(self.config, skip_none=False))
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


PROFILERS = ("simple", "advanced", "pytorch", "xla")  # the names Lightning's Trainer accepts as a string

# groups of settings that change speed or memory, never the maths: a resume may change them
RESUME_MAY_DIFFER = ("perf",)


class ResumeConflictError(ValueError):
    """A checkpoint was trained with settings that differ from this run's; the message names every key."""


def check_resume(ckpt_path: str, model_config) -> None:
    """Read ``ckpt_path`` safely and refuse it when its saved ``model.*`` values differ from this run's.

    Lightning would instead copy the checkpoint's values over the command line (and a checkpoint from elsewhere
    could redirect ``base_model`` or set ``random_base``); here the user's values always win or the run stops.
    """
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    saved = _dotted(nest_hparams({k: v for k, v in (ckpt.get("hyper_parameters") or {}).items()
                                  if not k.startswith("_")}))  # checkpoints saved flat, before settings.py, too
    now = _dotted(model_config.as_dict() if hasattr(model_config, "as_dict") else dict(model_config or {}))
    diff = [(k, v, now[k]) for k, v in saved.items()
            if k in now and k.split(".")[0] not in RESUME_MAY_DIFFER and _norm(v) != _norm(now[k])]
    if diff:
        lines = "\n".join(f"  model.{k}: checkpoint {v!r}, this run {n!r}" for k, v, n in diff)
        raise ResumeConflictError(
            f"--ckpt_path {ckpt_path} was trained with other settings than this run's:\n{lines}\nA resume keeps "
            "the run's settings: resume with the run's own config (fit --config <run dir>/config.yaml --ckpt_path "
            "last), or set these keys to the checkpoint's values. Nothing is taken from the checkpoint silently.")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _dotted(tree: dict, prefix: str = "") -> dict:
    """``{"lora": {"rank": 4}}`` as ``{"lora.rank": 4}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def matmul_precision(precision: Any) -> str:
    """The float32 matmul precision a run uses: ``high`` (TF32 on tensor-core GPUs) under mixed or half precision,
    where the UNet's matmuls already run in 16 bits and the few fp32 ones (loss, optimizer maths) lose nothing
    that matters; ``highest`` under ``32-true``/``64-true``, which a user picks to get full fp32.

    Args:
        precision: the trainer's ``precision`` value.
    """
    return "highest" if str(precision) in ("32", "32-true", "64", "64-true", "None") else "high"


class DreamBoothCLI(LightningCLI):
    """``python -m dreambooth_pl fit --config configs/<x>.yaml``; ``--print_config`` shows every value."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs):
        import sys

        quiet_third_party()
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else None
        check_moved_keys(argv if argv is not None else args)  # old flat model keys: name the new one, not "unknown"
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
        # every class or callable a value names passes the allowlist where jsonargparse imports it
        with config_guard.guarded(argv, args if isinstance(args, dict) else None):
            super().__init__(DreamBoothLoRA, DreamBoothDataModule, save_config_callback=VersionedSaveConfig,
                             save_config_kwargs={"overwrite": True}, trainer_defaults=trainer_defaults,
                             seed_everything_default=0, auto_configure_optimizers=False, parser_class=FitParser,
                             args=args, run=run, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        config_guard.current().check()  # a refused value that the parser then took as a plain string

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
        parser.link_arguments("model.base_model", "data.base_model")  # data.priors.generate draws with it
        parser.link_arguments("model.vae_model", "data.vae_model")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Lightning's, plus a ``step N/max_steps`` bar (unless ``trainer.enable_progress_bar: false`` or another
        bar is configured), a one-line parameter summary and the end-of-fit summary; sets the float32 matmul
        precision for the run's precision (:func:`matmul_precision`)."""
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        from .callbacks.progress import ParameterSummary, RunSummary, StepProgressBar

        given = [*(config.get("callbacks") or []), *callbacks, *self.trainer_defaults.get("callbacks", [])]
        callbacks = [*callbacks, RunSummary()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(StepProgressBar())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            callbacks.append(ParameterSummary())
        import torch

        torch.set_float32_matmul_precision(matmul_precision(config.get("precision")))
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """Trainer values Lightning would reject with a traceback (or accept and misbehave on), named here."""
        sub = self.config.get(self.config.get("subcommand") or "", self.config)
        trainer = sub.get("trainer") if hasattr(sub, "get") else None
        if trainer is None:
            return
        checks = (("max_steps", lambda v: v is None or v == -1 or v > 0, "> 0 (or -1: no step limit)"),
                  ("accumulate_grad_batches", lambda v: v is None or v >= 1, ">= 1"),
                  ("log_every_n_steps", lambda v: v is None or v >= 1, ">= 1"))
        for key, ok, want in checks:
            value = trainer.get(key)
            if not ok(value):
                raise ValueError(f"trainer.{key} must be {want}, got {value}")
        profiler = trainer.get("profiler")
        if isinstance(profiler, str) and profiler.lower() not in PROFILERS:  # Lightning raises it with a traceback
            raise ValueError(f"trainer.profiler {profiler!r} is not one of {', '.join(PROFILERS)} (or a Lightning "
                             "profiler class_path)")
        data, model = sub.get("data"), sub.get("model")
        if data is not None and model is not None and _get(data, "priors.enabled") \
                and model.get("prior_loss_weight") == 0:
            # data.priors.enabled is the switch; a zero weight would load and train on class images for nothing
            raise ValueError("model.prior_loss_weight is 0 while data.priors.enabled is true: prior preservation "
                             "is switched by data.priors.enabled; set it to false to train without class images, "
                             "or give model.prior_loss_weight > 0 (1.0 in the paper).")
        if self.config.get("subcommand") == "fit":
            place_run(sub)  # default_root_dir, `--ckpt_path last`'s run, an atomically claimed version folder

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which copies the checkpoint's hyper-parameters over the user's values: the file is
        read safely (a clear message for a damaged one) and any differing value is refused by name."""
        if not self.config.get("subcommand"):
            return
        sub = self.config[self.config.subcommand]
        if sub.get("ckpt_path") and Path(sub["ckpt_path"]).is_file():
            check_resume(sub["ckpt_path"], sub.get("model"))

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to this run's ``last.ckpt``, check it before any model loads, and load
        checkpoints with ``weights_only``; refuse to start a new run over a finished one."""
        self._check_outputs()
        last = RunDir.of(self.trainer).last_ckpt
        for folder in {last.parent, Path(self.trainer.log_dir or "."), *(Path(cb.path(self.trainer)).parent for cb in
                       self.trainer.callbacks if isinstance(cb, LoRAExport))}:
            clean_stale_temps(folder)  # temp files a killed run left beside its checkpoint, config or export
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("weights_only") is None and "weights_only" in self._subcommand_method_arguments["fit"]:
            kwargs["weights_only"] = True
        if kwargs.get("ckpt_path") == "last":
            path = str(last)
            if not os.path.exists(path):
                raise SystemExit(f"--ckpt_path last: no checkpoint at {path}. Resume with the run's own config "
                                 "(lightning_logs/version_N/config.yaml, which pins the version) or the run's "
                                 "trainer.default_root_dir / checkpoint.dirpath, or give the checkpoint file itself.")
            kwargs["ckpt_path"] = path
            check_resume(path, self.config[self.subcommand].get("model"))
        elif kwargs.get("ckpt_path") and not os.path.exists(kwargs["ckpt_path"]):
            raise SystemExit(f"--ckpt_path {kwargs['ckpt_path']!r} does not exist.")
        elif not kwargs.get("ckpt_path"):
            self._refuse_rerun(last)

    def _refuse_rerun(self, last: Path) -> None:
        """A run folder that already holds a checkpoint or an export belongs to an earlier run: never overwrite it."""
        export = next((cb.path(self.trainer) for cb in self.trainer.callbacks if isinstance(cb, LoRAExport)), None)
        found = [str(p) for p in (last, export) if p and os.path.exists(p)]
        if found:
            raise SystemExit(f"this run would overwrite an earlier run's files ({', '.join(found)}). Resume that run "
                             "with --ckpt_path last, or start a new one: leave trainer.logger.init_args.version unset "
                             "(a run's saved config.yaml pins it) or choose another save_dir.")

    def _check_outputs(self) -> None:
        """Every folder this run will write must be writable now, not after the models have loaded."""
        trainer = self.trainer
        dirs = {"trainer.default_root_dir": trainer.default_root_dir}
        model = self.model.hparams
        if model.get("random_base") and not os.path.exists(os.path.join(model["base_model"], "model_index.json")):
            dirs["model.base_model (random_base builds it)"] = model["base_model"]
        if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
            dirs["trainer.logger.init_args.save_dir"] = trainer.logger.save_dir
        data = getattr(self, "datamodule", None)
        if data is not None and data.hparams.get("latent_cache") not in (None, "auto"):  # auto warns, never stops
            dirs["data.latent_cache"] = data.hparams["latent_cache"]
        for cb in trainer.callbacks:
            for section, kind in (("checkpoint", ModelCheckpoint), ("export", LoRAExport)):
                if isinstance(cb, kind) and cb.dirpath:
                    dirs[f"{section}.dirpath"] = cb.dirpath
                    # never /, home or the cwd's parents; the cwd only if it holds fit's files. Other folders
                    # may hold anything (a run folder holds logs and ablate's files): _refuse_rerun guards exports
                    ours = ("*.ckpt", "checkpoints", "config.yaml", "hparams.yaml", "events.out.tfevents.*",
                            *(c.filename for c in trainer.callbacks if isinstance(c, LoRAExport)))
                    check_output_dir(cb.dirpath, "fit", f"{section}.dirpath", True, ours=ours, create=False)
        check_writable(dirs)


class _Parsed(Exception):
    """Carries a parsed fit config out of :func:`read_fit_config` before any class is built."""

    def __init__(self, config):
        super().__init__()
        self.config = config


class _ConfigReader(DreamBoothCLI):
    def _set_seed(self) -> None:  # reading a config must not reseed the caller's RNGs
        pass

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config.get(self.config.get("subcommand") or "fit", self.config))


def read_fit_config(*paths: str, partial: bool = False) -> dict:
    """The fit settings that ``fit --config P1 --config P2 ...`` would run with: the CLI's own parser (code defaults,
    stacked configs, linked values, the class-path guard), as a plain dict; nothing is instantiated or loaded.

    Args:
        paths: fit config files, later ones overriding earlier ones.
        partial: accept configs without the subject (``data.photos.dir`` / ``prompt``, then empty), for verbs
            that read only other sections.
    """
    subject = ["--data.photos.dir=", "--data.photos.prompt="] if partial else []  # the configs override these
    args = ["fit", *subject, *[a for p in paths for a in ("--config", str(p))]]
    try:
        _ConfigReader(args=args, run=True)
    except _Parsed as parsed:
        return parsed.config.as_dict()
    raise RuntimeError("read_fit_config: the parser finished without reaching instantiation")  # not reached
