"""The console of a fit: a step N/max_steps bar (not epochs) and one end-of-fit summary with the paths and commands."""
from __future__ import annotations

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
