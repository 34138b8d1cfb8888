"""The console filter hides exactly the listed third-party notices and keeps every other warning."""
from __future__ import annotations

import logging
import warnings

from dreambooth_pl.console import quiet_third_party


def test_listed_notices_are_hidden_and_others_kept(monkeypatch, caplog):
    monkeypatch.delenv("DREAMBOOTH_PL_SHOW_ALL_WARNINGS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("Found 715 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.")
        warnings.warn("model.noise_offset looks large")  # ours: kept
    assert [str(w.message) for w in seen] == ["model.noise_offset looks large"]
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers logs to its own handler
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
        diffusers_log.warning("There are modules in UNet2DConditionModel that should be kept in float32: []. ...")
        diffusers_log.warning("There are modules in X that should be kept in float32: ['a']")
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("  | Name\n4.0 K     Trainable params\n"
                                                                             "0         Total Flops")
    kept = list(dict.fromkeys(r.getMessage() for r in caplog.records))  # a record may reach two handlers
    assert kept == ["There are modules in X that should be kept in float32: ['a']",  # non-empty list: real news
                    "  | Name\n4.0 K     Trainable params"]


def test_the_switch_shows_everything(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_PL_SHOW_ALL_WARNINGS", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("Found 3 module(s) in eval mode at the start of training.")
    assert len(seen) == 1


def test_a_fit_prints_only_the_allowed_lines(tiny_base, subject_dirs, tmp_path):
    """The user's console of `python -m dreambooth_pl fit` with buckets, drawn class priors, the bar and the
    summary on: nothing else (conftest.CONSOLE_ALLOWED). The bucket table lists only buckets in use, once."""
    import re

    from conftest import fit_args, fit_console

    inst, _ = subject_dirs
    lines = fit_console(fit_args(tiny_base, inst, str(tmp_path / "drawn"), str(tmp_path), steps=2, **{
        "trainer.enable_progress_bar": "true", "trainer.enable_model_summary": "true",
        "data.crops.aspect_buckets": "true", "data.crops.bucket_step": "8", "data.priors.generate": "true",
        "data.priors.generation": "{sampler: {steps: 1}}"}), 600)
    assert not any(re.fullmatch(r"  \d+x\d+ \(\d\.\d\d\): 0 image\(s\)", ln) for ln in lines)
    assert any(ln.startswith("fit finished: step 2/2") for ln in lines)
