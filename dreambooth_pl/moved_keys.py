"""Keys that moved when the model's flat arguments became groups (settings.py): old configs and command lines stop
with a message naming the new key; old checkpoints' hyper-parameters are read in the new layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .config_guard import sources

# every flat ``model.*`` key that moved, and where it lives now (one table: configs, command lines, checkpoints)
MOVED = {
    "model.adapter": "model.lora.adapter",
    "model.lora_rank": "model.lora.rank",
    "model.lora_alpha": "model.lora.alpha",
    "model.lora_dropout": "model.lora.dropout",
    "model.lora_target_modules": "model.lora.target_modules",
    "model.lora_init": "model.lora.init",
    "model.train_text_encoder": "model.lora.train_text_encoder",
    "model.optimizer": "model.optim.name",
    "model.learning_rate": "model.optim.learning_rate",
    "model.weight_decay": "model.optim.weight_decay",
    "model.text_encoder_lr": "model.optim.text_encoder_lr",
    "model.text_encoder_weight_decay": "model.optim.text_encoder_weight_decay",
    "model.lr_scheduler": "model.optim.scheduler",
    "model.lr_warmup_steps": "model.optim.warmup_steps",
    "model.ema_decay": "model.ema.decay",
    "model.ema_export": "model.ema.export",
    "model.gradient_checkpointing": "model.perf.gradient_checkpointing",
    "model.checkpoint_every": "model.perf.checkpoint_every",
    "model.cache": "model.perf.cache",
    "model.compile_blocks": "model.perf.compile_blocks",
    "model.compile_regions": "model.perf.compile_regions",
    "model.compile_mode": "model.perf.compile_mode",
    "model.channels_last": "model.perf.channels_last",
    "model.attention": "model.perf.attention",
    "model.cuda_graph": "model.perf.cuda_graph",
    "model.memory_plan": "model.perf.memory_plan",
    "model.memory_budget_gib": "model.perf.memory_budget_gib",
    # the data module's groups (data/settings.py)
    "data.instance_dir": "data.photos.dir",
    "data.instance_prompt": "data.photos.prompt",
    "data.num_instance_images": "data.photos.num_images",
    "data.validation_photos": "data.photos.held_out",
    "data.with_prior_preservation": "data.priors.enabled",
    "data.class_dir": "data.priors.dir",
    "data.class_prompt": "data.priors.prompt",
    "data.num_class_images": "data.priors.num_images",
    "data.generate_class_images": "data.priors.generate",
    "data.class_generation": "data.priors.generation",
    "data.center_crop": "data.crops.center",
    "data.crop": "data.crops.around",
    "data.random_flip": "data.crops.flip",
    "data.aspect_buckets": "data.crops.aspect_buckets",
    "data.bucket_step": "data.crops.bucket_step",
    "data.bucket_max_ratio": "data.crops.bucket_max_ratio",
    "data.mask": "data.masks.source",
    "data.mask_floor": "data.masks.floor",
    # the class images' sampler: one sampling.SamplerSettings, passed whole
    **{f"data.{group}.{name}": f"data.priors.generation.sampler.{name}"
       for group in ("class_generation", "priors.generation")
       for name in ("scheduler", "steps", "guidance", "negative_prompt")},
    # an ablation grid file's evaluation: guidance is each sampler's own
    "evaluation.guidance": "evaluation.samplers[i].guidance",
    # tool options ("VERB --option"): the sampler's settings are one --sampler group
    **{f"{verb} --{name}": f"{verb} --sampler.{name}"
       for verb in ("sample", "generate-class-images", "evaluate-suite", "merge-eval")
       for name in ("scheduler", "steps", "guidance", "negative_prompt")},
    # SampleGrid's and SubjectMetrics' own samples (trainer.callbacks, init_args dropped as jsonargparse allows)
    **{f"trainer.callbacks.{name}": f"trainer.callbacks.sampler.{name}"
       for name in ("scheduler", "steps", "guidance", "negative_prompt")},
}
_VERBS = ("fit", "validate", "test", "predict")


class MovedKeyError(ValueError):
    """A config or command line sets a key by its old name; the message names the new one."""


def dotted_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a nested mapping (keys may themselves be dotted, as on a command line); a leading
    Trainer verb (``fit:``) is dropped, and an ``init_args`` level (a list of callbacks' entries) is skipped, as
    jsonargparse allows (``trainer.callbacks.sampler.steps``)."""
    if isinstance(tree, list):  # trainer.callbacks: one entry per callback
        for item in tree:
            yield from dotted_keys(item, prefix)
        return
    if not isinstance(tree, dict):
        return
    for k, v in tree.items():
        key = (f"{prefix}.{k}" if prefix else str(k)).replace(".init_args", "")
        if not prefix and key in _VERBS:
            yield from dotted_keys(v)
            continue
        yield key
        if key in ("model", "data") and isinstance(v, str) and Path(v).is_file():  # --model model.yaml, --data
            yield from dotted_keys(_read_yaml(v), key)
        yield from dotted_keys(v, key)


def _read_yaml(path: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # the parser reports unreadable files itself


def check_moved_keys(argv: list[str] | dict, where: str = "the arguments") -> None:
    """Refuse old key names in the command line and its ``--config`` files (or a dict of arguments).

    Args:
        argv: the command line (``--config`` files are read too), or a dict of arguments (LightningCLI's ``args``,
            a grid's overrides).
        where: how messages name a dict's origin.
    Raises:
        MovedKeyError: naming the first old key, its new name and where it was set, then any others.
    """
    found = {}
    for origin, tree in (sources(argv) if isinstance(argv, list) else [(where, argv)]):
        for key in dotted_keys(tree):
            if key in MOVED:
                found.setdefault(key, origin)
    if found:
        (old, origin), *rest = found.items()
        more = (f"; also {', '.join(f'{o} -> {MOVED[o]}' for o, _ in rest)}" if rest else "")
        raise MovedKeyError(f"{old} moved to {MOVED[old]} (configs and command lines): {origin} sets {old}; "
                            f"rename it{more}.")


def check_moved_options(verb: str, argv: list[str]) -> None:
    """Refuse a tool verb's old option names (``sample --steps 30``), naming the new one (``--sampler.steps``).

    Args:
        verb: the tool verb (``sample``).
        argv: its arguments, the verb left out.
    Raises:
        MovedKeyError: naming the first old option and its new name.
    """
    for arg in argv:
        key = f"{verb} {arg.partition('=')[0]}"
        if arg.startswith("--") and key in MOVED:
            raise MovedKeyError(f"{key} moved to {MOVED[key]}: rename it (python -m dreambooth_pl {verb} --help "
                                "lists the options).")


def nest_hparams(hparams: dict, section: str = "model") -> dict:
    """A checkpoint's ``hyper_parameters`` (or an old run's config section) in the grouped layout
    (``{"lora": {"rank": 4, ...}, ...}``), whether it was saved flat or grouped; values it lacks stay absent.

    Args:
        hparams: the flat or grouped values.
        section: ``model`` (a checkpoint's ``hyper_parameters``) or ``data`` (``datamodule_hyper_parameters``,
            a config's ``data`` section).
    """
    nested: dict = {}
    for key, value in hparams.items():
        new = MOVED.get(f"{section}.{key}")
        if new is None:
            if isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
            continue
        group, name = new.split(".")[1:]
        nested.setdefault(group, {})[name] = value
    return nested
