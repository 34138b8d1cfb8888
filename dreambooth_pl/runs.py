"""A fit run on disk, and the one way to write a fit command line.

``RunDir`` is the only spelling of a run's layout: what its version folder holds (``config.yaml``,
``checkpoints/last.ckpt`` or ``checkpoint.dirpath``'s, the exported LoRA), found from a trainer, a folder or a file
inside it. :func:`claim_version` takes a new version folder atomically, :func:`latest_resumable` finds the run
``--ckpt_path last`` continues. :func:`fit_command` builds ``fit`` arguments from configs and ``key: value``
overrides, optionally pinning every output into a run folder. The CLI, the callbacks, the ablation and fit-many
runners, checkpoint curves, evaluation, the benchmark and the tests use them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .adapter import LORA_FILE

CONFIG_FILE = "config.yaml"
LAST_CKPT = "last.ckpt"
VERSION = re.compile(r"version_(\d+)")


@dataclass(frozen=True)
class RunDir:
    """A fit run's version folder (``lightning_logs/version_N``, or an ablation cell's ``runs/NAME``).

    Args:
        path: the folder.
        checkpoint_dir: ``checkpoint.dirpath`` where the run set one (None: ``path/checkpoints``).
    """

    path: Path
    checkpoint_dir: Optional[Path] = None

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST_CKPT

    @classmethod
    def at(cls, path: str | Path) -> "RunDir":
        """The run in folder ``path``, with the ``checkpoint.dirpath`` its saved config.yaml names."""
        run = cls(Path(path))
        dirpath = (run.config().get("checkpoint") or {}).get("dirpath")
        return cls(run.path, Path(dirpath)) if dirpath else run

    @classmethod
    def of(cls, trainer) -> "RunDir":
        """The run ``trainer`` writes: its log dir (a collective under DDP: call it on every rank) and the
        ModelCheckpoint's ``dirpath`` where one is set."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        dirpath = next((cb.dirpath for cb in trainer.checkpoint_callbacks
                        if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)
        return cls(Path(trainer.log_dir or trainer.default_root_dir), Path(dirpath) if dirpath else None)

    @property
    def lora(self) -> Path:
        return self.path / LORA_FILE

    def config(self) -> dict:
        """The run's saved ``config.yaml`` ({} if absent): a complete dump of what the fit ran with."""
        import yaml

        try:
            return yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
        except OSError:
            return {}

    @classmethod
    def holding(cls, file: str | Path, levels: int = 3) -> Optional["RunDir"]:
        """The run folder at most ``levels`` folders above ``file`` (e.g. its exported LoRA), or None."""
        for folder in Path(file).resolve().parents[:levels]:
            if (folder / CONFIG_FILE).is_file():
                return cls.at(folder)
        return None


def _launched_as_rank_zero() -> bool:
    """No launcher (torchrun, SLURM, Lightning's own DDP children, another node) marked this process non-zero."""
    keys = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "JSM_NAMESPACE_RANK")
    return all(os.environ.get(k, "0") == "0" for k in keys)


def claim_version(root: str | Path) -> Optional[int]:
    """Take the next free ``root/version_N`` by creating it (``os.mkdir`` fails if another process got there
    first: then try N + 1), so fits started at once in one root never share a folder. None on a non-zero rank,
    whose paths Lightning broadcasts from rank 0, and where ``root`` cannot be written (fit's output check says so).

    Args:
        root: ``<save_dir>/<name>`` of the logger.
    """
    if not _launched_as_rank_zero():
        return None
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := VERSION.fullmatch(p.name))]
    except OSError:  # not a folder, or not writable: fit's output check names it with the fix, before any model loads
        return None
    n = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{n}")
            return n
        except FileExistsError:
            n += 1
        except OSError:
            return None


def latest_resumable(root: str | Path) -> Optional[RunDir]:
    """The newest ``root/version_N`` (highest N) holding a ``last.ckpt``, or None: what ``--ckpt_path last``
    continues when no version is pinned."""
    root = Path(root)
    runs = sorted(((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                   if (m := VERSION.fullmatch(p.name))), reverse=True)
    return next((RunDir.at(p) for _, p in runs if RunDir.at(p).last_ckpt.is_file()), None)


def override(key: str, value: Any) -> str:
    """``--key=value``, with YAML/JSON literals for booleans, None, lists and dicts."""
    text = json.dumps(value) if isinstance(value, (bool, list, dict, type(None))) else str(value)
    return f"--{key}={text}"


def fit_command(configs: Sequence[str] = (), overrides: Optional[Mapping[str, Any]] = None,
                run: Optional[RunDir] = None, resume: bool = False, verb: bool = True) -> list[str]:
    """Arguments of ``python -m dreambooth_pl fit`` (or ``DreamBoothCLI(args=...)``).

    Args:
        configs: ``--config`` files, later ones overriding earlier ones.
        overrides: ``{"model.lora.rank": 8, ...}``, after the configs.
        run: pin the logger version, checkpoints and export into this folder (``<save_dir>/<name>/<version>``).
        resume: continue from the run's ``last.ckpt``.
        verb: lead with ``fit``; false for ``DreamBoothCLI(args=..., run=False)``, which parses fit's arguments
            without a subcommand and leaves calling ``trainer.fit`` to the caller (tools/benchmark.py).
    """
    args = ["fit"] if verb else []
    args += [a for c in configs for a in ("--config", str(c))]
    args += [override(k, v) for k, v in (overrides or {}).items()]
    if run is not None:
        args += [f"--trainer.logger.init_args.save_dir={run.path.parent.parent}",
                 f"--trainer.logger.init_args.name={run.path.parent.name}",
                 f"--trainer.logger.init_args.version={run.path.name}", f"--checkpoint.dirpath={run.checkpoints}",
                 f"--export.dirpath={run.path}", f"--export.filename={LORA_FILE}"]
    return args + (["--ckpt_path=last"] if resume else [])


def place_run(fit_config) -> None:
    """Decide where a fit writes, before any class is built (edits the parsed ``fit`` config in place).

    The logger's ``save_dir`` left at ``.`` follows ``trainer.default_root_dir``; with no pinned logger version,
    ``--ckpt_path last`` continues the newest run that has a ``last.ckpt`` (unless ``checkpoint.dirpath`` names
    where that is), and a new run claims its version folder atomically (:func:`claim_version`).

    Args:
        fit_config: the ``fit`` subcommand's parsed config (a jsonargparse Namespace).
    """
    trainer = fit_config.get("trainer")
    init = getattr(trainer.get("logger") if trainer is not None else None, "init_args", None)
    if init is None or not hasattr(init, "save_dir") or not hasattr(init, "version"):
        return  # no logger, or one without a version folder: Lightning's default_root_dir rules apply
    if trainer.get("default_root_dir") is not None and str(init.save_dir) == ".":
        init.save_dir = str(trainer.get("default_root_dir"))
    if init.version is not None:
        return
    root = Path(init.save_dir) / (getattr(init, "name", None) or "")
    if fit_config.get("ckpt_path") == "last":
        if not (fit_config.get("checkpoint") or {}).get("dirpath"):
            run = latest_resumable(root)
            m = VERSION.fullmatch(run.path.name) if run is not None else None
            init.version = (int(m.group(1)) if m else run.path.name) if run is not None else None
            return
    init.version = claim_version(root)
