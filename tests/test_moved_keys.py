"""moved_keys.py: old flat model keys, the sampler's old keys and tool options in configs, command lines and grid
files stop with the new key's name; old checkpoints' hyper-parameters read in the grouped layout."""
from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import yaml

from conftest import REPO, fit_args
from dreambooth_pl.moved_keys import MOVED, MovedKeyError, check_moved_keys, nest_hparams


@pytest.mark.parametrize("section", ["model", "data"])
def test_every_new_key_exists_and_no_old_one_does(section):
    from dreambooth_pl.data.datamodule import DreamBoothDataModule
    from dreambooth_pl.module import DreamBoothLoRA

    cls = {"model": DreamBoothLoRA, "data": DreamBoothDataModule}[section]
    params = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    groups = {name: {f.name for f in dataclasses.fields(hint)} for name, hint in hints.items()
              if dataclasses.is_dataclass(hint)}
    for old, new in ((o, n) for o, n in MOVED.items() if o.startswith(f"{section}.") and o.count(".") == 1):
        assert old.split(".", 1)[1] not in params, old
        _, group, name = new.split(".")
        assert name in groups[group], new


@pytest.mark.parametrize("argv", [["--model.lora_rank=8"], ["--model.lora_rank", "8"], ["--model.lora_rank"],
                                  ["--model", '{"lora_rank": 8}']])
def test_command_line_forms_name_the_new_key(argv):
    with pytest.raises(MovedKeyError, match=r"^model.lora_rank moved to model.lora.rank \(configs and command "
                                            r"lines\): --model.* sets model.lora_rank; rename it.$"):
        check_moved_keys(["fit", "--model.lora.alpha=2", *argv])


def test_sampler_keys_name_the_one_sampler_type(tmp_path):
    from dreambooth_pl.__main__ import main

    with pytest.raises(MovedKeyError, match=r"^data.priors.generation.steps moved to "
                                            r"data.priors.generation.sampler.steps .*--data.priors.generation.steps"):
        check_moved_keys(["fit", "--data.priors.generation.steps=4"])
    for verb in ("sample", "generate-class-images", "evaluate-suite"):
        with pytest.raises(MovedKeyError, match=f"^{verb} --steps moved to {verb} --sampler.steps: rename it"):
            main([verb, "--out", str(tmp_path), "--steps=2"])  # before any model loads or folder is made
    with pytest.raises(MovedKeyError, match="sample --negative_prompt moved to sample --sampler.negative_prompt"):
        main(["sample", "--negative_prompt", "blurry"])
    with pytest.raises(MovedKeyError, match="merge-eval --guidance moved to merge-eval --sampler.guidance"):
        main(["merge-eval", "--guidance", "7"])
    # SampleGrid / SubjectMetrics: on the command line, and in a config's callback list (init_args or not)
    with pytest.raises(MovedKeyError, match="^trainer.callbacks.steps moved to trainer.callbacks.sampler.steps"):
        check_moved_keys(["fit", "--trainer.callbacks.init_args.steps=2"])
    cfg = tmp_path / "callbacks.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "dreambooth_pl.callbacks.sample_grid.SampleGrid", "init_args": {"every_n_steps": 5}},
        {"class_path": "dreambooth_pl.callbacks.subject_metrics.SubjectMetrics",
         "init_args": {"scheduler": "ddim"}}]}}))
    with pytest.raises(MovedKeyError, match="^trainer.callbacks.scheduler moved to "
                                            f"trainer.callbacks.sampler.scheduler .*: {cfg} sets"):
        check_moved_keys(["fit", "--config", str(cfg)])
    assert not tmp_path.joinpath("x").exists()


def test_every_stacked_config_is_read(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"model": {"lora": {"rank": 8}}}))
    second.write_text(yaml.safe_dump({"model": {"cuda_graph": True, "learning_rate": 1e-3}}))
    with pytest.raises(MovedKeyError, match="model.cuda_graph moved"):
        check_moved_keys(["fit", "-c", str(second)])  # LightningCLI's short form of --config
    with pytest.raises(MovedKeyError) as err:
        check_moved_keys(["fit", "--config", str(first), "--config", str(second)])
    msg = str(err.value)
    assert msg.startswith(f"model.cuda_graph moved to model.perf.cuda_graph (configs and command lines): {second} "
                          "sets model.cuda_graph") and "model.learning_rate -> model.optim.learning_rate" in msg
    assert "\n" not in msg
    model_only = tmp_path / "model.yaml"  # --model FILE: a file of the model's arguments alone
    model_only.write_text(yaml.safe_dump({"ema_decay": 0.9}))
    with pytest.raises(MovedKeyError, match="model.ema_decay moved to model.ema.decay"):
        check_moved_keys(["fit", "--model", str(model_only)])
    with pytest.raises(MovedKeyError, match="model.adapter moved to model.lora.adapter .*: the arguments sets"):
        check_moved_keys({"fit": {"model": {"adapter": "dora"}}})


def test_shipped_configs_use_no_old_key():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        check_moved_keys(["--config", str(path)])


def test_the_cli_and_the_shell_stop_with_the_message_before_any_model_loads(subject_dirs, tmp_path, monkeypatch,
                                                                            capsys):
    from dreambooth_pl import __main__
    from dreambooth_pl.cli import DreamBoothCLI

    cfg = tmp_path / "old.yaml"
    cfg.write_text("model:\n  lora_rank: 8\n")
    args = fit_args("unused", *subject_dirs, str(tmp_path))
    args[1:1] = ["--config", str(cfg)]
    with pytest.raises(MovedKeyError, match=f"model.lora_rank moved to model.lora.rank .*: {cfg} sets"):
        DreamBoothCLI(args=args)
    monkeypatch.setattr("sys.argv", ["dreambooth_pl", "fit", "--model.cuda_graph=true"])
    with pytest.raises(SystemExit) as done:
        __main__._shell()
    assert str(done.value).splitlines()[0] == ("error: model.cuda_graph moved to model.perf.cuda_graph (configs and "
                                               "command lines): --model.cuda_graph sets model.cuda_graph; rename it.")


@pytest.mark.parametrize("argv, message", [
    (["--data.instance_dir=x"], r"^data.instance_dir moved to data.photos.dir \(configs and command lines\): "
                                r"--data.instance_dir sets data.instance_dir; rename it.$"),
    (["--data", '{"with_prior_preservation": false, "random_flip": 0.5}'],
     "^data.with_prior_preservation moved to data.priors.enabled .*; also data.random_flip -> data.crops.flip"),
    (["--data.crop", "face"], "^data.crop moved to data.crops.around"),
    (["--data.class_generation", "{steps: 1}"], "^data.class_generation moved to data.priors.generation .*also "
                                                "data.class_generation.steps -> data.priors.generation.sampler.steps"),
])
def test_old_data_keys_name_their_group(argv, message):
    with pytest.raises(MovedKeyError, match=message):
        check_moved_keys(["fit", "--data.photos.prompt=a", *argv])


def test_an_old_data_config_stops_the_cli_with_the_new_key(tmp_path):
    from dreambooth_pl.cli import DreamBoothCLI

    cfg = tmp_path / "old.yaml"
    cfg.write_text("data:\n  instance_dir: photos\n  num_class_images: 4\n")
    with pytest.raises(MovedKeyError, match=f"^data.instance_dir moved to data.photos.dir .*: {cfg} sets "
                                            "data.instance_dir; rename it; also data.num_class_images -> "
                                            "data.priors.num_images"):
        DreamBoothCLI(args=["fit", "--config", str(cfg)])


def test_old_flat_data_hparams_and_run_configs_nest():
    flat = {"instance_dir": "p", "instance_prompt": "a sks dog", "with_prior_preservation": False,
            "class_generation": {"batch_size": 2}, "resolution": 64, "mask_floor": 0.2}
    assert nest_hparams(flat, "data") == {"photos": {"dir": "p", "prompt": "a sks dog"}, "resolution": 64,
                                          "priors": {"enabled": False, "generation": {"batch_size": 2}},
                                          "masks": {"floor": 0.2}}
    grouped = {"photos": {"dir": "p"}, "crops": {"flip": 0.5}, "seed": 1}
    assert nest_hparams(grouped, "data") == grouped


def test_old_flat_checkpoint_hparams_nest_and_grouped_ones_stay():
    flat = {"base_model": "b", "vae_dtype": "float32", "lora_rank": 8, "adapter": "dora", "learning_rate": 1e-3,
            "ema_decay": None, "cuda_graph": True}
    grouped = {"base_model": "b", "vae_dtype": "float32", "lora": {"rank": 8, "adapter": "dora"},
               "optim": {"learning_rate": 1e-3}, "ema": {"decay": None}, "perf": {"cuda_graph": True}}
    assert nest_hparams(flat) == grouped
    assert nest_hparams(grouped) == grouped
