"""memory_plan.py: the fastest plan that fits wins, estimates scale with pixels and images, and no fit is a clear
error naming every plan's need; on a CPU ``auto`` leaves the manual switches alone."""
from __future__ import annotations

import pytest
import torch

from dreambooth_pl import memory_plan as mp


def test_fastest_plan_that_fits_wins():
    weights = 5.0
    need = {p.checkpoint_every: mp.estimate(p, weights, 1024, 2) for p in mp.PLANS}
    assert mp.choose(weights, 1024, 2, 100.0, True).checkpoint_every == 0
    assert mp.choose(weights, 1024, 2, need[2] + 0.01, True).checkpoint_every == 2
    assert mp.choose(weights, 1024, 2, need[2] - 0.01, True).checkpoint_every == 1
    assert [p.s_per_step for p in mp.PLANS] == sorted(p.s_per_step for p in mp.PLANS)  # fastest first


def test_estimate_scales_activations_with_pixels_and_images():
    plan = mp.PLANS[0]
    assert mp.estimate(plan, 5.0, 1024, 2) == pytest.approx(5.0 + plan.activations_gib)
    assert mp.estimate(plan, 5.0, 512, 2) == pytest.approx(5.0 + plan.activations_gib / 4)
    assert mp.estimate(plan, 5.0, 1024, 4) == pytest.approx(5.0 + 2 * plan.activations_gib)


def test_runs_that_cannot_graph_get_eager_plans():
    plan = mp.choose(5.0, 1024, 2, 100.0, graph_allowed=False)
    assert not plan.cuda_graph and plan.checkpoint_every == 0 and "eager" in plan.name


def test_nothing_fits_names_every_plan_and_the_fix():
    with pytest.raises(mp.MemoryPlanError) as err:
        mp.choose(5.0, 1024, 2, 6.0, True)
    text = str(err.value)
    assert all(p.name in text for p in mp.PLANS) and "data.resolution" in text and "6.0 GiB" in text


def test_frozen_gib_counts_parameters_and_buffers():
    m = torch.nn.Linear(1024, 256, dtype=torch.float16)
    m.register_buffer("b", torch.zeros(1024, dtype=torch.float32))
    assert mp.frozen_gib(m) == pytest.approx((1024 * 256 * 2 + 256 * 2 + 1024 * 4) / 2**30)


def test_auto_on_cpu_warns_and_keeps_manual_switches(tiny_base, subject_dirs, tmp_path):
    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.warns(UserWarning, match="memory_plan=auto plans GPU memory"):
        cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1,
                                          **{"model.perf.memory_plan": "auto"}))
    assert cli.model.speed == {"cache": "off", "cuda_graph": False, "checkpoint_every": 0}


def test_bad_budget_is_refused_by_key():
    from dreambooth_pl.settings import PerfSettings

    with pytest.raises(ValueError, match="model.perf.memory_budget_gib must be > 0"):
        PerfSettings(memory_budget_gib=0)


@pytest.mark.parametrize("te,extra,expect", [(False, 3.0, (1, True, "all")), (False, 8.5, (2, True, "all")),
                                             (True, 100.0, (0, False, "latents"))])
def test_plan_speed_reads_the_run(tiny_base, monkeypatch, te, extra, expect):
    """The run's own resident weights plus the plan's activations decide (budget = weights + ``extra`` GiB)."""
    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import LoraSettings

    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(train_text_encoder=te))
    module.configure_model()
    seen = {}
    monkeypatch.setattr(mp, "budget", lambda device, requested: seen.setdefault("b", extra + mp.frozen_gib(
        module.unet, *([module.text_encoder, module.text_encoder_2] if te else [])) + 0.01))
    speed = mp.plan_speed(module, torch.device("cuda"), {"resolution": 1024, "batch_size": 1,
                                                          "with_prior_preservation": True})
    assert (speed["checkpoint_every"], speed["cuda_graph"], speed["cache"]) == expect
