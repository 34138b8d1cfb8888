"""The grid file of ``ablate``: typed sections (runs, cartesian overrides, evaluation) and its expansion into cells."""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ..sampler_settings import SAMPLER, SamplerSettings


def sampler_key(sampler: SamplerSettings) -> str:
    """The folder name of one sampler's evaluation: ``scheduler-steps``, then guidance and a negative prompt's
    mark where they differ from the defaults (so samplers that differ only there do not share a folder)."""
    extra = (f"-g{sampler.guidance:g}" if sampler.guidance != SAMPLER.guidance else "") \
        + ("-neg" if sampler.negative_prompt else "")
    return f"{sampler.scheduler}-{sampler.steps}{extra}"


@dataclass
class Evaluation:
    """How every LoRA is evaluated (arguments of ``evaluate_suite``).

    Args:
        token: the identifier in the prompts, e.g. ``sks``.
        class_name: the subject's class, e.g. ``dog``.
        instance_dir: reference photos (None: the run's ``data.photos.dir``).
        suite: prompt suite name (``dreambooth_pl.prompts.list_suites()``).
        num_prompts: first N prompts of the suite (None: all).
        images_per_prompt: images per prompt (seeds ``seed .. seed + N - 1``).
        samplers: one evaluation per sampler (scheduler, steps, guidance, negative prompt; the original
            project's table crosses DDIM/PNDM x 50/80 steps).
        resolution: image side (None: the base's default).
        clip_weights: open_clip weights tag (None: random weights, tests only).
        dino_weights: DINO weights tag (None: random weights, tests only).
        seed: first seed.
        pres_images: samples of "a <class_name>" for the PRES (prior preservation) score (0: skip).
        class_prompt: prompt of those samples (None: "a <class_name>"; use the fit's class prompt).
        drift: also sample them with the base alone at the same seeds and report language drift.
        face_weights: face identity (``dlib`` or a folder with dlib's two model files; None: skipped).
    """

    token: str
    class_name: str
    instance_dir: Optional[str] = None
    suite: str = "dreambench_object"
    num_prompts: Optional[int] = None
    images_per_prompt: int = 4
    samplers: list[SamplerSettings] = field(default_factory=lambda: [SAMPLER])
    resolution: Optional[int] = None
    clip_weights: Optional[str] = "openai"
    dino_weights: Optional[str] = "dino"
    seed: int = 0
    pres_images: int = 8
    class_prompt: Optional[str] = None
    drift: bool = False
    face_weights: Optional[str] = "dlib"

    def suite_args(self) -> dict[str, Any]:
        """The arguments of ``evaluate_suite`` this evaluation fixes, by name: every field but ``samplers`` (one
        evaluation each) and ``instance_dir`` (the run's photos unless set), which the caller passes itself."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("samplers", "instance_dir")}


@dataclass
class Cell:
    """An explicit cell: overrides (dotted fit-config keys) and an optional name."""

    overrides: dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = None


@dataclass
class AblationGrid:
    """A grid file.

    Args:
        base_config: fit config file(s) every run starts from (paths relative to the working directory).
        out: output folder (runs/, results.csv, results.md, plots).
        overrides: fixed overrides applied to every run, e.g. ``trainer.max_steps: 800``.
        grid: cartesian product of overrides, e.g. ``{data.priors.enabled: [true, false]}``.
        runs: explicit cells; with ``grid`` too, each explicit cell is crossed with the product.
        evaluation: how runs are evaluated (None: fits only).
    """

    base_config: list[str]
    out: str
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[Cell] = field(default_factory=list)
    evaluation: Optional[Evaluation] = None


def load_grid(path: str) -> AblationGrid:
    """Parse and type-check a grid file; errors name the file and the key."""
    from ..moved_keys import MovedKeyError, check_moved_keys
    from .typed_yaml import load_typed

    def old_keys(raw: dict) -> None:  # evaluation.guidance is each sampler's now: name it, not "unexpected key"
        check_moved_keys({"evaluation": raw.get("evaluation")}, f"grid file {path!r}")

    spec = load_typed(path, AblationGrid, "ablate", "grid file", "configs/ablations/ for examples", old_keys)
    for key, values in spec.grid.items():
        if not isinstance(values, list) or not values:
            raise SystemExit(f"ablate: {path!r} grid.{key} must be a non-empty list of values, got {values!r}.")
    if isinstance(spec.base_config, str):
        spec.base_config = [spec.base_config]
    try:  # every cell would fail on it: say so before the first fit
        check_moved_keys({**spec.overrides, **spec.grid, **{k: v for c in spec.runs for k, v in c.overrides.items()}},
                         f"grid file {path!r}")
        check_moved_keys([a for c in spec.base_config for a in ("--config", c)])  # its base configs too
    except MovedKeyError as e:
        raise SystemExit(f"ablate: {e}") from None
    return spec


def check_evaluation(ev: Evaluation, path: str) -> None:
    """Refuse unknown suites and samplers that share a folder before hours of fitting, naming the grid file and key
    (each sampler checked its own values when the grid was read)."""
    from ..prompts import list_suites

    keys = [sampler_key(s) for s in ev.samplers]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SystemExit(f"ablate: {path!r} evaluation.samplers lists {twice} more than once; drop the repeats.")
    if ev.suite not in list_suites():
        raise SystemExit(f"ablate: {path!r} evaluation.suite {ev.suite!r} is unknown; choose one of {list_suites()}.")


def _slug(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (bool, list, dict, type(None))) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "_", text).strip("_")


def _short(key: str) -> str:
    """A key's name in a cell name: its last component (``model.lora.rank`` -> ``rank``), but a data group's field
    keeps its group (``data.priors.enabled`` -> ``priors.enabled``): ``enabled`` or ``num_images`` alone is unclear."""
    parts = key.split(".")
    return ".".join(parts[1:]) if parts[0] == "data" and len(parts) == 3 else parts[-1]


def cell_name(overrides: dict[str, Any]) -> str:
    """``key=value`` pairs joined by ``__`` (each dotted key shortened by :func:`_short`), safe as a folder name."""
    return "__".join(f"{_short(k)}={_slug(v)}" for k, v in overrides.items()) or "base"


def expand(spec: AblationGrid) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, overrides)]`` of every cell: explicit cells crossed with the cartesian product of ``grid``."""
    keys = list(spec.grid)
    product = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))]
    explicit = spec.runs or [Cell()]
    cells, seen = [], {}
    for cell in explicit:
        for combo in product:
            over = {**cell.overrides, **combo}
            name = "__".join(p for p in (cell.name, cell_name(combo) if combo else None) if p) or cell_name(over)
            if name in seen:
                raise SystemExit(f"ablate: two cells are both named {name!r} ({seen[name]} and {over}); give the "
                                 "explicit runs distinct names.")
            seen[name] = over
            cells.append((name, over))
    return cells
