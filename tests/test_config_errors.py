"""Config errors surface before any model loads, each as one message naming the option and the fix.

None of these runs a model: the base path does not even exist, proving the error comes first.
"""
from __future__ import annotations

import pytest
from conftest import fit_args

from dreambooth_pl.cli import DreamBoothCLI

NO_BASE = "/nonexistent/base-never-loaded"


def _cli(tmp_path, *extra, run=True, class_dir=True):
    inst, cls = tmp_path / "instance", tmp_path / "class"
    args = fit_args(NO_BASE, str(inst), str(cls) if class_dir else None, str(tmp_path / "logs")) + list(extra)
    return DreamBoothCLI(args=args if run else args[1:], run=run)


@pytest.mark.parametrize("missing, present", [("data.priors.dir", "data.priors.prompt"),
                                              ("data.priors.prompt", "data.priors.dir")])
def test_prior_preservation_needs_class_dir_and_prompt(tmp_path, missing, present):
    with pytest.raises(ValueError, match=rf"prior preservation needs {missing}; set it, or set "
                                         r"data.priors.enabled: false"):
        _cli(tmp_path, "--data.priors.enabled", "true", f"--{present}", "x", f"--{missing}", "null",
             class_dir=False, run=False)


def test_text_encoder_lora_with_cached_text_embeddings(tmp_path):
    with pytest.raises(ValueError, match=r"model.perf.cache=all .*model.lora.train_text_encoder=true.*Use "
                                         r"model.perf.cache=latents"):
        _cli(tmp_path, "--model.lora.train_text_encoder", "true", "--model.perf.cache", "all", run=False)


def test_fp16_vae_refused_at_parse_time(tmp_path, capsys):
    """The SDXL VAE overflows in fp16: vae_dtype offers only float32/bfloat16/auto, even under 16-mixed."""
    with pytest.raises(SystemExit):
        _cli(tmp_path, "--trainer.precision", "16-mixed", "--model.vae_dtype", "float16", run=False)
    err = capsys.readouterr().err
    assert "vae_dtype" in err and "float32" in err and "bfloat16" in err


def test_unwritable_output_dirs_fail_at_start_all_listed(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    keys = ["checkpoint.dirpath", "export.dirpath", "trainer.logger.init_args.save_dir", "data.latent_cache"]
    with pytest.raises(SystemExit, match=r"output folder\(s\) cannot be written") as err:
        _cli(tmp_path, *[a for k in keys for a in (f"--{k}", str(tmp_path / "a_file" / k))])
    for key in keys:
        assert f"\n  {key} = {tmp_path / 'a_file' / key}: " in str(err.value), key


def test_missing_resume_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match=r"--ckpt_path last: no checkpoint at .*Resume with the run's own config"):
        _cli(tmp_path, "--ckpt_path", "last")
    with pytest.raises(SystemExit, match="does not exist"):
        _cli(tmp_path, "--ckpt_path", str(tmp_path / "nope.ckpt"))


def test_prior_preservation_has_one_switch(tiny_base, subject_dirs, tmp_path):
    """data.priors.enabled switches prior preservation; a zero prior weight beside it is refused by name."""
    import pytest

    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.raises(ValueError, match="model.prior_loss_weight is 0 while data.priors.enabled is true"):
        DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1,
                                    **{"model.prior_loss_weight": 0}))
