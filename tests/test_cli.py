"""DreamBoothCLI: bad input fails before any model loads, the shipped configs parse, ``--ckpt_path last`` resumes."""
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from dreambooth_pl.cli import DreamBoothCLI
from conftest import REPO, fit_args


def _fails(args: list[str], capsys) -> str:
    """Run the CLI on bad input; return the error text, whether raised or printed by the argument parser."""
    with pytest.raises((SystemExit, ValueError)) as err:
        DreamBoothCLI(args=args)
    return str(err.value) + capsys.readouterr().err


def test_unknown_key_on_the_command_line(subject_dirs, tmp_path, capsys, no_model_load):
    msg = _fails(fit_args("unused", *subject_dirs, str(tmp_path)) + ["--model.lora_rnk", "8"], capsys)
    assert "lora_rnk" in msg


def test_unknown_key_in_a_config_file(subject_dirs, tmp_path, capsys, no_model_load):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"base_model": "unused", "prior_los_weight": 1.0}}))
    args = fit_args("unused", *subject_dirs, str(tmp_path))
    args[1:1] = ["--config", str(cfg)]  # right after the subcommand, as a user would type it
    msg = _fails(args, capsys)
    assert "prior_los_weight" in msg


@pytest.mark.parametrize("override, message", [
    ({"model.lora.rank": 0}, "model.lora.rank must be > 0"),
    ({"model.prior_loss_weight": -1.0}, "prior_loss_weight must be >= 0"),
    ({"data.resolution": 100}, "data.resolution must be a positive multiple of 8"),
    ({"trainer.max_steps": -5}, "trainer.max_steps must be > 0 (or -1"),
    ({"trainer.accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches must be >= 1, got 0"),
    ({"model.noise_offset": -0.1}, "model.noise_offset must be >= 0"),
    ({"model.optim.warmup_steps": -3}, "model.optim.warmup_steps must be >= 0"),
    ({"data.photos.prompt": " "}, "data.photos.prompt is empty"),
])
def test_bad_values_fail_before_the_model_loads(subject_dirs, tmp_path, capsys, no_model_load, override, message):
    assert message in _fails(fit_args("unused", *subject_dirs, str(tmp_path), **override), capsys)


def _break(case: str, inst: Path, cls: Path, tmp_path: Path) -> tuple[list[str], str]:
    """Make one kind of bad data; return (instance dir, class dir) arguments and the expected message."""
    if case == "corrupt image":
        (inst / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        return [str(inst), str(cls)], re.escape(str(inst / "broken.jpg"))
    if case == "missing instance dir":
        return [str(tmp_path / "nowhere"), str(cls)], "instance dir .*nowhere' does not exist"
    if case == "empty instance dir":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty"), str(cls)], "instance dir .*empty' holds no images"
    return [str(inst), str(tmp_path / "no_priors")], "has 0 image.*python -m dreambooth_pl generate-class-images"


@pytest.mark.parametrize("case", ["corrupt image", "missing instance dir", "empty instance dir", "too few priors"])
def test_bad_data_is_reported_before_the_model_loads(case, subject_dirs, tiny_base, tmp_path, no_model_load):
    from dreambooth_pl.data.images import ImageIntakeError

    dirs, message = _break(case, Path(subject_dirs[0]), Path(subject_dirs[1]), tmp_path)
    with pytest.raises(ImageIntakeError, match=message):
        DreamBoothCLI(args=fit_args(tiny_base, *dirs, str(tmp_path / "logs")))


def test_ckpt_path_last_without_a_checkpoint_says_what_to_do(subject_dirs, tiny_base, tmp_path, no_model_load):
    with pytest.raises(SystemExit, match="no checkpoint at .*last.ckpt.*config.yaml"):
        DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path)) + ["--ckpt_path", "last"])


@pytest.mark.parametrize("name, prior", [("sdxl_lora_prior.yaml", True), ("sdxl_lora_no_prior.yaml", False)])
def test_shipped_sdxl_configs_hold_the_original_run(name, prior, capsys):
    with pytest.raises(SystemExit) as done:
        DreamBoothCLI(args=["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert done.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    assert m["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    lora, optim, perf = m["lora"], m["optim"], m["perf"]
    assert (lora["rank"], optim["learning_rate"], optim["name"], perf["memory_plan"]) == (4, 1e-4, "adamw", "auto")
    assert perf["gradient_checkpointing"] is None and perf["cache"] is None  # the plan picks them for the card
    assert (t["precision"], t["max_steps"], d["resolution"]) == ("16-mixed", 1000, 1024)
    photos, priors = d["photos"], d["priors"]  # the data groups (data/settings.py), shown whole
    assert (photos["dir"], photos["prompt"], photos["held_out"]) == ("data/rraj", "a photo of rraj person", 0)
    assert priors["enabled"] is prior and priors["generation"]["sampler"]["scheduler"] == "euler"
    assert (d["crops"]["center"], d["masks"]["source"]) == (False, "files")
    if prior:
        assert (m["prior_loss_weight"], priors["num_images"]) == (1.0, 197)
        assert (priors["dir"], priors["prompt"]) == ("data/class_person", "a photo of person")


@pytest.mark.parametrize("name", ["sdxl_lora_prior.yaml", "sdxl_lora_no_prior.yaml"])
def test_shipped_recipes_follow_the_reference_defaults(name, capsys):
    """diffusers' train_dreambooth_lora_sdxl.py: --max_grad_norm 1.0, gaussian LoRA init, --text_encoder_lr 5e-6,
    --adam_weight_decay 1e-4, --adam_weight_decay_text_encoder 1e-3."""
    with pytest.raises(SystemExit):
        DreamBoothCLI(args=["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    t, m = cfg["trainer"], cfg["model"]
    assert (t["gradient_clip_val"], t.get("gradient_clip_algorithm") or "norm") == (1.0, "norm")
    optim = m["optim"]
    assert (m["lora"]["init"], optim["text_encoder_lr"], optim["weight_decay"], optim["text_encoder_weight_decay"]) == (
        "gaussian", 5e-6, 1e-4, 1e-3)


class ResumeProbe(L.Callback):
    """Records where a (resumed) fit starts: step, optimizer state and learning rate."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.start = (trainer.global_step, {k: v.clone() for k, v in opt.state_dict()["state"][0].items()},
                      opt.param_groups[0]["lr"])


def _lora(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "pytorch_lora_weights.safetensors")


def test_resume_continues_at_the_same_step_optimizer_state_and_lr(subject_dirs, tiny_base, tmp_path):
    # a warm-up schedule whose LR does not depend on max_steps, so the interrupted and the full run share it
    sched = {"model.optim.scheduler": "constant_with_warmup", "model.optim.warmup_steps": 3,
             "model.optim.learning_rate": 1e-3}
    DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / "full"), steps=3, **sched))
    DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / "cut"), steps=2, **sched))
    run = tmp_path / "cut" / "lightning_logs" / "version_0"
    stopped = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 2
    files = [run / "config.yaml", run / "pytorch_lora_weights.safetensors", run / "checkpoints" / "last.ckpt"]
    before = [p.read_bytes() for p in files]
    with pytest.raises(SystemExit, match="would overwrite an earlier run.*--ckpt_path last"):
        DreamBoothCLI(args=["fit", "--config", str(run / "config.yaml")])  # a rerun without --ckpt_path
    assert [p.read_bytes() for p in files] == before
    probe = ResumeProbe()
    DreamBoothCLI(args=["fit", "--config", str(run / "config.yaml"), "--trainer.max_steps", "3", "--ckpt_path", "last"],
                  trainer_defaults={"callbacks": [probe]})
    step, state, lr = probe.start
    assert step == 2
    saved = stopped["optimizer_states"][0]
    assert all(torch.equal(state[k], saved["state"][0][k]) for k in saved["state"][0])
    assert lr == pytest.approx(1e-3 * 2 / 3) == saved["param_groups"][0]["lr"]
    assert not (tmp_path / "cut" / "lightning_logs" / "version_1").exists()  # the same run folder continues
    full, resumed = _lora(tmp_path / "full" / "lightning_logs" / "version_0"), _lora(run)
    assert full.keys() == resumed.keys()
    for k in full:  # same data position, noise, optimizer moments and LR: the same weights as never stopping
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-7)


def test_offline_hub_id_from_the_shell_is_one_message_not_a_traceback(subject_dirs, tmp_path, monkeypatch):
    from dreambooth_pl.__main__ import _shell

    hub_id = "dreambooth-pl-tests/no-such-sdxl"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["dreambooth_pl", *fit_args(hub_id, subject_dirs[0], None, str(tmp_path))])
    with pytest.raises(SystemExit) as done:
        _shell()
    msg = done.value.code  # a str code: Python prints it alone on stderr and exits 1, no traceback
    assert isinstance(msg, str) and done.value.__suppress_context__
    assert f"base model {hub_id!r}" in msg and "unreachable" in msg and "model.base_model" in msg


@pytest.mark.parametrize("layout", ["flat", "grouped"])
def test_a_checkpoint_never_overrides_the_command_line(subject_dirs, tiny_base, tmp_path, no_model_load, layout):
    """Lightning copied a checkpoint's hyper-parameters over the user's (learning rate, base_model, random_base):
    now every differing key is named and the run stops, and the user's folder is untouched. Checkpoints saved with
    the flat keys of before settings.py are compared by their new names."""
    user = tmp_path / "v"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    ckpt = tmp_path / "other.ckpt"
    hp = {"base_model": str(user), "random_base": "tiny"}
    if layout == "flat":
        hp.update(learning_rate=123.0, lora_rank=8, compile_blocks=True, cuda_graph=True, memory_plan="auto")
    else:
        hp.update(optim={"learning_rate": 123.0}, lora={"rank": 8},
                  perf={"compile_blocks": True, "cuda_graph": True, "memory_plan": "auto"})
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": hp}, ckpt)
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path / "logs"), ckpt_path=ckpt,
                    **{"model.optim.learning_rate": 1e-4})
    with pytest.raises(ValueError) as err:
        DreamBoothCLI(args=args)
    msg = str(err.value)
    for key in ("model.optim.learning_rate: checkpoint 123.0, this run 0.0001", "model.lora.rank: checkpoint 8, "
                "this run 4", "model.base_model", "model.random_base"):
        assert key in msg
    assert all(k not in msg for k in ("compile_blocks", "cuda_graph", "memory_plan"))  # speed may change on resume
    assert (user / "thesis.txt").read_text() == "years of work" and (user / "sub").is_dir()


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_ckpt_path_last_damaged_is_named_before_the_model_loads(content, subject_dirs, tiny_base, tmp_path,
                                                               no_model_load):
    """A 0-byte or garbage last.ckpt (and a dead writer's temp file) at --ckpt_path last: one clear message."""
    ckpt_dir = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(content)
    stale = ckpt_dir / ".last.ckpt.999999999.abcd.dbpl-tmp"  # no such pid: its writer is gone
    stale.write_bytes(b"")
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), ckpt_path="last",
                    **{"trainer.logger.init_args.version": 0})
    with pytest.raises(ValueError, match=r"checkpoint '.*last\.ckpt' is (empty|not a PyTorch).*resume from another"):
        DreamBoothCLI(args=args)
    assert not stale.exists()


@pytest.mark.parametrize("cfg, message", [
    ({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback",
                                 "init_args": {"on_fit_start": "os.system"}}]}},
     r"trainer.callbacks\[0\].class_path = lightning.pytorch.callbacks.LambdaCallback: it calls whatever function"),
    ({"trainer": {"logger": {"class_path": "this.X"}}}, "trainer.logger.class_path = this.X: it is outside dreambooth_pl"),
])
def test_configs_may_name_only_project_and_lightning_classes(cfg, message, subject_dirs, tmp_path, capsys,
                                                             no_model_load):
    """jsonargparse imported ``this`` (printing the Zen of Python) and LambdaCallback reached os.system; the full
    walk over every class and callable parameter is in test_config_guard.py."""
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = fit_args("unused", *subject_dirs, str(tmp_path))
    args[1:1] = ["--config", str(path)]
    with pytest.raises(ValueError, match=message):
        DreamBoothCLI(args=args)
    assert "Beautiful is better than ugly" not in capsys.readouterr().out  # `this` was never imported
    for form in (["-c", str(path)], [f"-c{path}"], [f"-c={path}"]):  # LightningCLI's short forms of --config
        with pytest.raises(ValueError, match=message):
            DreamBoothCLI(args=[args[0], *form, *args[3:]])
    with pytest.raises(SystemExit):  # an abbreviated --config is not an option at all
        DreamBoothCLI(args=[args[0], "--conf", str(path), *args[3:]])
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


def test_read_fit_config_is_the_fit_parser_without_building_anything(tmp_path):
    """Verbs read fit configs as fit would (code defaults, stacked configs, links), load nothing, reseed nothing."""
    import yaml

    from dreambooth_pl.cli import read_fit_config
    from dreambooth_pl.data.class_images import NUM_CLASS_IMAGES

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"model": {"base_model": "somewhere/base"}, "data": {
        "photos": {"dir": "x", "prompt": "a photo of sks dog"}, "priors": {"prompt": "a photo of dog"}}}))
    b.write_text(yaml.safe_dump({"data": {"priors": {"prompt": "a photo of cat"}}}))
    torch.manual_seed(123)
    expected = torch.rand(2)
    torch.manual_seed(123)
    cfg = read_fit_config(a, b)
    assert torch.equal(torch.rand(2), expected)
    assert cfg["data"]["priors"]["prompt"] == "a photo of cat"  # the later config wins
    assert cfg["data"]["priors"]["num_images"] == NUM_CLASS_IMAGES  # a code default the YAML never names
    assert cfg["data"]["base_model"] == "somewhere/base"  # linked from model.base_model
    b.write_text(yaml.safe_dump({"data": {"priors": {"dir": "cls"}}}))
    with pytest.raises(SystemExit):
        read_fit_config(b)  # no subject: a fit config is incomplete ...
    assert read_fit_config(b, partial=True)["data"]["priors"]["dir"] == "cls"  # ... unless the verb reads other parts
