"""settings.py: each group refuses its own bad values by full key, check_model the bad combinations; the CLI shows
and overrides every grouped value; checkpoints store the groups as plain data."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from conftest import REPO
from dreambooth_pl.settings import EmaSettings, LoraSettings, OptimSettings, PerfSettings, check_model, plain


@pytest.mark.parametrize("group, kwargs, message", [
    (LoraSettings, {"rank": 0}, "model.lora.rank must be > 0, got 0"),
    (LoraSettings, {"alpha": -1.0}, "model.lora.alpha must be > 0 or null"),
    (LoraSettings, {"dropout": 1.0}, r"model.lora.dropout must be in \[0, 1\), got 1.0"),
    (LoraSettings, {"target_modules": []}, "model.lora.target_modules must be a non-empty list"),
    (LoraSettings, {"adapter": "ia3"}, "model.lora.adapter must be lora, dora, lokr or loha, got 'ia3'"),
    (LoraSettings, {"adapter": "lokr", "dropout": 0.1}, "model.lora.dropout=0.1 is an input dropout of LoRA/DoRA"),
    (OptimSettings, {"learning_rate": 0.0}, "model.optim.learning_rate must be > 0, got 0.0"),
    (OptimSettings, {"text_encoder_lr": 0.0}, "model.optim.text_encoder_lr must be > 0 or null"),
    (OptimSettings, {"weight_decay": -1e-4}, "model.optim.weight_decay must be >= 0"),
    (OptimSettings, {"text_encoder_weight_decay": -1.0}, "model.optim.text_encoder_weight_decay must be >= 0"),
    (OptimSettings, {"warmup_steps": -3}, "model.optim.warmup_steps must be >= 0, got -3"),
    (EmaSettings, {"decay": 1.0}, r"model.ema.decay must be in \[0, 1\) or null"),
    (PerfSettings, {"checkpoint_every": 0}, "model.perf.checkpoint_every must be >= 1 .*gradient_checkpointing: false"),
    (PerfSettings, {"cache": "everything"}, "model.perf.cache must be off, latents or all"),
    (PerfSettings, {"memory_plan": "magic"}, "model.perf.memory_plan must be manual or auto"),
    (PerfSettings, {"memory_budget_gib": 0}, "model.perf.memory_budget_gib must be > 0 or null, got 0"),
    (PerfSettings, {"group_qkv": True}, "model.perf.group_qkv must be false unless model.perf.fused_lora is true"),
])
def test_each_group_refuses_its_bad_values_by_full_key(group, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group(**kwargs)


def test_defaults_are_frozen_so_shared_default_instances_cannot_drift():
    """The module's signature shares one default instance per group between all modules."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraSettings().rank = 8


def test_check_model_refuses_what_spans_groups():
    check_model(LoraSettings(train_text_encoder=True), PerfSettings(cache="latents"), 0.0, None)  # encoders stay
    with pytest.raises(ValueError, match="model.perf.cache=all .*model.lora.train_text_encoder=true.*Use "
                                         "model.perf.cache=latents"):
        check_model(LoraSettings(train_text_encoder=True), PerfSettings(cache="all"), 0.0, None)
    with pytest.raises(ValueError, match="model.perf.cuda_graph .* model.perf.compile_blocks breaks"):
        check_model(LoraSettings(), PerfSettings(cuda_graph=True, compile_blocks=True), 0.0, None)
    with pytest.raises(ValueError, match="model.noise_offset must be >= 0"):
        check_model(LoraSettings(), PerfSettings(), -0.1, None)
    with pytest.raises(ValueError, match="model.snr_gamma must be > 0 or null"):
        check_model(LoraSettings(), PerfSettings(), 0.0, 0.0)


def test_plain_hparams_load_with_weights_only(tmp_path):
    """A checkpoint is read with ``weights_only=True``: the groups must be stored as plain dicts."""
    hp = plain({"seed": 3, "lora": LoraSettings(rank=8), "perf": PerfSettings(cache="all")})
    assert hp["seed"] == 3 and hp["lora"]["rank"] == 8 and hp["perf"]["cache"] == "all"
    torch.save({"hyper_parameters": hp}, tmp_path / "c.ckpt")
    assert torch.load(tmp_path / "c.ckpt", weights_only=True)["hyper_parameters"] == hp


def test_print_config_shows_every_grouped_value_and_dotted_overrides_apply(capsys):
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.raises(SystemExit):
        DreamBoothCLI(args=["fit", "--config", str(REPO / "configs" / "sdxl_lora_prior.yaml"), "--model.lora.rank",
                            "8", "--model.optim.name=prodigy", "--model.perf.cache=latents", "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    for name, group in (("lora", LoraSettings), ("optim", OptimSettings), ("ema", EmaSettings),
                        ("perf", PerfSettings)):
        assert set(model[name]) == {f.name for f in dataclasses.fields(group)}, name
    assert (model["lora"]["rank"], model["lora"]["alpha"]) == (8, 4)  # the override, and the config's own value
    assert (model["optim"]["name"], model["optim"]["learning_rate"]) == ("prodigy", 1e-4)
    assert (model["perf"]["cache"], model["perf"]["memory_plan"], model["perf"]["cuda_graph"]) == ("latents", "auto", None)


def test_the_cli_hands_the_module_typed_groups(tiny_base, subject_dirs, tmp_path):
    """LightningCLI saves its config dump (plain dicts) as the hyper-parameters; the module keeps the typed groups."""
    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path))[1:] + ["--model.lora.rank=8"],
                        run=False)
    assert cli.model.hparams.lora == LoraSettings(rank=8, init=False)
    assert cli.model.hparams.perf == PerfSettings() and cli.model.hparams.optim == OptimSettings()


def test_the_module_types_plain_dict_groups():
    """load_from_checkpoint hands the saved (plain) groups back to __init__."""
    from dreambooth_pl.module import DreamBoothLoRA

    module = DreamBoothLoRA(base_model="unused", lora={"rank": 8}, perf={"cache": "latents"})
    assert module.hparams.lora == LoraSettings(rank=8) and module.hparams.perf == PerfSettings(cache="latents")
    with pytest.raises(ValueError, match="model.lora.rank must be > 0"):
        DreamBoothLoRA(base_model="unused", lora={"rank": 0})
