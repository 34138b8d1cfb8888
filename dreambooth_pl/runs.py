"""A fit run on disk, and the one way to write a fit command line.

``RunDir`` names what a run's version folder holds (``config.yaml``, ``checkpoints/last.ckpt``, the exported LoRA);
:func:`fit_command` builds ``fit`` arguments from configs and ``key: value`` overrides, optionally pinning every
output into a run folder. The ablation runner, checkpoint curves, evaluation, the benchmark and the tests
use them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .adapter.files import LORA_FILE

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunDir:
    """A fit run's version folder (``lightning_logs/version_N``, or an ablation cell's ``runs/NAME``).

    Args:
        path: the folder.
    """

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

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
                return cls(folder)
        return None


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
