"""runs.py: what a run folder holds, found from a file inside it, and the one fit command-line builder."""
from __future__ import annotations

import yaml

from dreambooth_pl.adapter.files import LORA_FILE
from dreambooth_pl.runs import RunDir, fit_command


def test_run_dir_names_its_files_and_is_found_from_inside(tmp_path):
    run = RunDir(tmp_path / "lightning_logs" / "version_3")
    assert (run.config_file.name, run.last_ckpt.relative_to(run.path).as_posix(), run.lora.name) == (
        "config.yaml", "checkpoints/last.ckpt", LORA_FILE)
    assert run.config() == {} and RunDir.holding(run.lora) is None
    run.checkpoints.mkdir(parents=True)
    run.config_file.write_text(yaml.safe_dump({"data": {"with_prior_preservation": False}}))
    assert RunDir.holding(run.last_ckpt) == run and run.config()["data"]["with_prior_preservation"] is False


def test_fit_command_orders_configs_overrides_pins_and_resume(tmp_path):
    run = RunDir(tmp_path / "grid" / "runs" / "rank8")
    args = fit_command(["a.yaml", "b.yaml"], {"model.lora.rank": 8, "data.with_prior_preservation": False,
                                              "model.lora.target_modules": ["to_q"], "model.vae_model": None},
                       run, resume=True)
    assert args[:5] == ["fit", "--config", "a.yaml", "--config", "b.yaml"]
    assert args[5:9] == ["--model.lora.rank=8", "--data.with_prior_preservation=false",
                         '--model.lora.target_modules=["to_q"]', "--model.vae_model=null"]
    assert f"--trainer.logger.init_args.save_dir={tmp_path / 'grid'}" in args
    assert "--trainer.logger.init_args.name=runs" in args and "--trainer.logger.init_args.version=rank8" in args
    assert f"--export.dirpath={run.path}" in args and args[-1] == "--ckpt_path=last"
    assert fit_command(["a.yaml"], {"trainer.max_steps": 3}, verb=False) == ["--config", "a.yaml",
                                                                             "--trainer.max_steps=3"]
