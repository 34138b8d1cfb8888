"""runs.py: what a run folder holds, found from a file inside it, and the one fit command-line builder."""
from __future__ import annotations

import pytest
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
    args = fit_command(["a.yaml", "b.yaml"], {"model.lora.rank": 8, "data.priors.enabled": False,
                                              "model.lora.target_modules": ["to_q"], "model.vae_model": None},
                       run, resume=True)
    assert args[:5] == ["fit", "--config", "a.yaml", "--config", "b.yaml"]
    assert args[5:9] == ["--model.lora.rank=8", "--data.priors.enabled=false",
                         '--model.lora.target_modules=["to_q"]', "--model.vae_model=null"]
    assert f"--trainer.logger.init_args.save_dir={tmp_path / 'grid'}" in args
    assert "--trainer.logger.init_args.name=runs" in args and "--trainer.logger.init_args.version=rank8" in args
    assert f"--export.dirpath={run.path}" in args and args[-1] == "--ckpt_path=last"
    assert fit_command(["a.yaml"], {"trainer.max_steps": 3}, verb=False) == ["--config", "a.yaml",
                                                                             "--trainer.max_steps=3"]


def test_claim_version_gives_racing_callers_distinct_folders(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from dreambooth_pl.runs import claim_version

    (tmp_path / "version_4").mkdir(parents=True)
    with ThreadPoolExecutor(8) as pool:  # every thread lists the same folders, then races on os.mkdir
        got = sorted(pool.map(lambda _: claim_version(tmp_path), range(8)))
    assert got == list(range(5, 13)) and all((tmp_path / f"version_{n}").is_dir() for n in got)
    monkeypatch.setenv("NODE_RANK", "1")  # another node's process: Lightning broadcasts rank 0's folder to it
    assert claim_version(tmp_path) is None and not (tmp_path / "version_13").exists()


def _lora(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _fit(args: list[str]) -> None:
    from dreambooth_pl.cli import DreamBoothCLI

    DreamBoothCLI(args=args)


def test_default_root_dir_and_checkpoint_dirpath_are_honoured_on_resume(tiny_base, subject_dirs, tmp_path):
    import torch

    from conftest import fit_args

    inst, _ = subject_dirs
    root = tmp_path / "D"

    def args(steps, *extra):
        a = [x for x in fit_args(tiny_base, inst, None, "unused", steps) if "logger.init_args.save_dir" not in x]
        return [*a, f"--trainer.default_root_dir={root}", *extra]

    _fit(args(1))
    run = RunDir.at(root / "lightning_logs" / "version_0")
    assert run.last_ckpt.is_file() and not (tmp_path / "lightning_logs").exists()
    _fit(args(2, "--ckpt_path=last"))  # no version pinned: continues D's newest run
    assert torch.load(run.last_ckpt, weights_only=True)["global_step"] == 2
    assert not (root / "lightning_logs" / "version_1").exists() and run.lora.is_file()

    ckpts = tmp_path / "elsewhere"
    _fit(args(1, f"--checkpoint.dirpath={ckpts}"))
    assert (ckpts / "last.ckpt").is_file() and RunDir.at(root / "lightning_logs" / "version_1").last_ckpt == \
        ckpts / "last.ckpt"
    _fit(args(2, f"--checkpoint.dirpath={ckpts}", "--ckpt_path=last"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2
    straight = tmp_path / "straight"
    _fit([*args(2), f"--trainer.default_root_dir={straight}"])
    resumed, ref = _lora(root / "lightning_logs" / "version_2" / LORA_FILE), \
        _lora(straight / "lightning_logs" / "version_0" / LORA_FILE)
    assert resumed.keys() == ref.keys() and all(torch.equal(resumed[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_two_fits_started_at_once_in_one_root_get_two_folders_and_two_intact_loras(tiny_base, subject_dirs,
                                                                                    tmp_path):
    import os
    import subprocess
    import sys

    import torch

    from conftest import REPO, fit_args

    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "dreambooth_pl", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    runs = sorted((tmp_path / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for n, path in enumerate(runs):
        run = RunDir.at(path)
        saved = yaml.safe_load(run.config_file.read_text())["trainer"]["logger"]["init_args"]["version"]
        assert saved == n and [p.name for p in run.checkpoints.iterdir()] == ["last.ckpt"]  # no last-v1.ckpt
        assert len(list(path.glob("events.out.tfevents.*"))) == 1
    a, b = (_lora(RunDir(r).lora) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same config, same seed
