"""The console of a fit: a step N/max_steps bar (not epochs) and one end-of-fit summary with the paths and commands."""
from __future__ import annotations

import json

from conftest import fit_args
from dreambooth_pl.callbacks.progress import RunSummary, StepProgressBar
from dreambooth_pl.cli import DreamBoothCLI


def test_fit_shows_steps_and_ends_with_a_summary(tiny_base, subject_dirs, tmp_path, capsys):
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=3, **{"trainer.enable_progress_bar": "true"})
    cli = DreamBoothCLI(args=args)
    assert any(isinstance(c, StepProgressBar) for c in cli.trainer.callbacks)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step 3/3" in text and "Epoch" not in text and "v_num" not in text
    summary = text[text.index("fit finished: step 3/3"):]
    run = cli.trainer.log_dir
    for line in (f"LoRA:        {run}/pytorch_lora_weights.safetensors", f"checkpoint:  {run}/checkpoints/last.ckpt",
                 f"--config {run}/config.yaml --ckpt_path last", "sample --base", "final loss"):
        assert line in summary, line


def test_no_bar_when_progress_bar_is_off_but_the_summary_stays(tiny_base, subject_dirs, tmp_path):
    cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1))
    assert not any(isinstance(c, StepProgressBar) for c in cli.trainer.callbacks)
    assert any(isinstance(c, RunSummary) for c in cli.trainer.callbacks)


def test_one_parameter_line_instead_of_the_model_table(tiny_base, subject_dirs, tmp_path, capfd):
    """Lightning's table lists every SDXL module (6,000+ rows) and warns that it cannot summarise mixed
    precision; the fit prints one line with the counts Lightning's table ends with."""
    from lightning.pytorch.callbacks import ModelSummary

    from dreambooth_pl.callbacks.progress import ParameterSummary

    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1, **{"trainer.enable_model_summary": "true"})
    cli = DreamBoothCLI(args=args)
    summaries = [c for c in cli.trainer.callbacks if isinstance(c, ModelSummary)]
    assert len(summaries) == 1 and isinstance(summaries[0], ParameterSummary)
    out = capfd.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("parameters:")]
    n_train = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in cli.model.parameters() if not p.requires_grad)
    assert len(lines) == 1 and "Trainable params" not in out.out + out.err
    assert lines[0] == (f"parameters: {n_train / 1e3:.1f} K trainable ({n_train * 4 / 2**20:.1f} MiB of adapters), "
                        f"{n_frozen / 1e6:.2f} M frozen")


def test_the_summary_prints_each_phase_and_writes_them(tiny_base, subject_dirs, tmp_path, capsys):
    """Priors drawn (data.priors.generate) and inputs cached: every phase has its seconds, they add up to the
    run, and phases.json in the run folder holds the same numbers."""
    import json

    args = fit_args(tiny_base, subject_dirs[0], str(tmp_path / "priors"), str(tmp_path), steps=3, **{
        "data.priors.generate": "true", "data.priors.num_images": 2,
        # a cache of its own: the session's shared prior cache may hold these images already (drawn by an earlier
        # test), and priors linked from it take ~0 s
        "data.priors.generation": json.dumps({"sampler": {"steps": 1}, "batch_size": 2,
                                              "cache_dir": str(tmp_path / "prior-cache")}),
        "model.perf.cache": "all"})
    cli = DreamBoothCLI(args=args)
    text = capsys.readouterr().out
    phases = json.loads((tmp_path / "lightning_logs" / "version_0" / "phases.json").read_text())
    assert phases == next(c for c in cli.trainer.callbacks if isinstance(c, RunSummary)).phases
    assert "phases:      start" in text and f"priors {phases['priors']:.1f} s" in text
    assert phases["priors"] > 0 and phases["cache"] > 0 and phases["steps"] > 0 and phases["start"] > 0
    parts = sum(phases[k] for k in ("start", "priors", "cache", "first_step", "steps", "export"))
    assert abs(parts - phases["total"]) < 0.05  # rounding of each part
    assert phases["to_first_step_without_priors"] < phases["total"] - phases["priors"]
    dm = cli.datamodule  # the images checked and cached: the end-to-end benchmark scales that phase by them
    assert phases["n_priors"] == len(dm.prior.paths) == 2 and phases["n_images"] == len(dm.instance.paths) + 2
    split = [phases[k] for k in ("start_to_trainer", "start_data", "start_load", "start_adapters")]
    # the data's setup and the adapters can round to 0.00 s on the tiny base; imports and loading never do
    assert all(v >= 0 for v in split) and split[0] > 0 and split[2] > 0 and sum(split) <= phases["start"] + 0.05



def test_resuming_a_finished_run_writes_no_phases_file_into_the_working_folder(tiny_base, subject_dirs, tmp_path,
                                                                               monkeypatch):
    """A run resumed at its last step trains nothing (Lightning skips ``on_train_start``): the summary prints and
    nothing lands in the working folder (such a rerun's phases.json was committed twice from the repo root)."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1)
    first = DreamBoothCLI(args=args)
    again = DreamBoothCLI(args=args + ["--ckpt_path", f"{first.trainer.log_dir}/checkpoints/last.ckpt"])
    assert again.trainer.global_step == 1
    assert next(c for c in again.trainer.callbacks if isinstance(c, RunSummary)).phases["steps"] == 0
    assert not (work / "phases.json").exists()
