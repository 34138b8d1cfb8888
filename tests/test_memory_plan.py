"""memory_plan.py: the fastest plan that fits (less the headroom) wins, estimates scale with pixels and images, no
fit is a clear error naming every plan's need; ``resolve_perf`` keeps every switch the user set, writes the graph
rule once, and off a GPU (or with ``manual``) reads unset switches as off."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dreambooth_pl import memory_plan as mp
from dreambooth_pl.data.datamodule import DataShape
from dreambooth_pl.settings import LoraSettings, PerfSettings

H200 = mp.Target("cuda", 139.0, half=True)
AUTO = PerfSettings(memory_plan="auto")


def test_fastest_plan_that_fits_wins():
    weights, usable = 5.0, 1 - mp.HEADROOM
    need = {p.name: mp.estimate(p, weights, 1024, 2) for p in mp.PLANS}
    fused, every2, every1 = mp.PLANS[0], mp.PLANS[2], mp.PLANS[3]
    assert mp.choose(weights, 1024, 2, 100.0, True) == fused
    assert mp.choose(weights, 1024, 2, (need[every2.name] + 0.01) / usable, True, mp.PLANS[1:]) == every2
    assert mp.choose(weights, 1024, 2, (need[every2.name] - 0.01) / usable, True, mp.PLANS[1:]) == every1
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


def switches(p: PerfSettings) -> tuple:
    return (p.cache, p.cuda_graph, p.gradient_checkpointing, p.checkpoint_every, p.fused_lora, p.fused_blocks,
            p.group_qkv)


@pytest.mark.parametrize("budget,expect", [
    (139.0, ("all", True, False, 1, True, True, True)),  # an 80 GB-class card: the fast preset's plan
    (15.0, ("all", True, True, 1, False, False, False)),  # a 16 GB card's budget: the T4 plan, not every 2nd block
    (16.0, ("all", True, True, 2, False, False, False)),
    (18.0, ("all", True, False, 1, True, True, True)),  # the fused kernels lower the no-checkpointing peak
])
def test_auto_picks_by_budget(budget, expect):
    target = dataclasses.replace(H200, free_gib=budget)
    lines = []
    got = mp.resolve_perf(AUTO, LoraSettings(), DataShape(1024, 2), target, 5.06, lines.append)
    assert switches(got) == expect
    assert len(lines) == 1 and lines[0].startswith("memory plan: ") and f"of {budget:.1f} GiB" in lines[0]


def test_explicit_switches_win_over_the_plan():
    perf = PerfSettings(memory_plan="auto", gradient_checkpointing=True, checkpoint_every=2, fused_lora=False)
    got = mp.resolve_perf(perf, LoraSettings(), DataShape(), H200, 5.06)
    assert switches(got) == ("all", True, True, 2, False, False, False)
    got = mp.resolve_perf(PerfSettings(memory_plan="auto", cuda_graph=False, cache="latents"), LoraSettings(),
                          DataShape(), H200, 5.06)
    assert (got.cuda_graph, got.cache, got.gradient_checkpointing, got.fused_blocks) == (False, "latents", False, True)


def test_the_graph_rule_and_the_adapter_kind_shape_the_plan():
    lines = []
    te = mp.resolve_perf(AUTO, LoraSettings(train_text_encoder=True), DataShape(), H200, 8.0, lines.append)
    assert (te.cache, te.cuda_graph) == ("latents", False) and "eager" in lines[0]
    dora = mp.resolve_perf(AUTO, LoraSettings(adapter="dora"), DataShape(), H200, 5.06)
    assert (dora.fused_lora, dora.group_qkv, dora.fused_blocks) == (False, False, True)  # the fused node is LoRA's
    full = mp.resolve_perf(AUTO, LoraSettings(), DataShape(), dataclasses.replace(H200, half=False), 5.06, lines.append)
    assert (full.fused_blocks, full.gradient_checkpointing) == (False, False) and "fused kernels" in lines[-1]


def test_manual_and_cpu_read_unset_switches_as_off():
    want = ("off", False, False, 1, False, False, False)
    assert switches(mp.resolve_perf(PerfSettings(), LoraSettings(), DataShape(), H200)) == want
    assert switches(mp.resolve_perf(AUTO, LoraSettings(), DataShape(), mp.Target())) == want
    given = PerfSettings(cache="all", cuda_graph=True)
    assert mp.resolve_perf(given, LoraSettings(), DataShape(), H200) == dataclasses.replace(
        given, gradient_checkpointing=False, checkpoint_every=1, fused_lora=False, fused_blocks=False,
        group_qkv=False, fused_norms=False, channels_last=False)


@pytest.mark.parametrize("kernels", [True, False])
def test_the_fused_plan_takes_the_triton_norms_and_nhwc_where_they_run(kernels, monkeypatch):
    """Both on with the fused plan where Triton runs (without the kernels NHWC copies around every norm: slower);
    off in the checkpointed plans (not measured there); a value the user gives wins."""
    from dreambooth_pl import fused_norms

    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: kernels)
    fast = mp.resolve_perf(AUTO, LoraSettings(), DataShape(1024, 2), H200, 5.06)
    assert (fast.fused_norms, fast.channels_last) == (kernels, kernels)
    t4 = mp.resolve_perf(AUTO, LoraSettings(), DataShape(1024, 2), dataclasses.replace(H200, free_gib=15.0), 5.06)
    assert (t4.fused_norms, t4.channels_last) == (False, False)
    given = mp.resolve_perf(dataclasses.replace(AUTO, channels_last=False), LoraSettings(), DataShape(1024, 2), H200,
                            5.06)
    assert (given.fused_norms, given.channels_last) == (kernels, False)
    off = mp.resolve_perf(dataclasses.replace(AUTO, fused_norms=False), LoraSettings(), DataShape(1024, 2), H200, 5.06)
    assert (off.fused_norms, off.channels_last) == (False, False)  # NHWC follows the norms unless set


def test_auto_on_cpu_warns_and_keeps_manual_switches(tiny_base, subject_dirs, tmp_path):
    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.warns(UserWarning, match="memory_plan=auto plans GPU memory"):
        cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=1,
                                          **{"model.perf.memory_plan": "auto"}))
    assert switches(cli.model.perf) == ("off", False, False, 1, False, False, False)


def test_bad_budget_is_refused_by_key():
    with pytest.raises(ValueError, match="model.perf.memory_budget_gib must be > 0"):
        PerfSettings(memory_budget_gib=0)
    with pytest.raises(ValueError, match="model.perf.group_qkv must be false unless"):
        PerfSettings(group_qkv=True)
    PerfSettings(group_qkv=True, memory_plan="auto")  # auto may turn fused_lora on


def test_module_plans_with_its_own_weights(tiny_base):
    """The module counts its resident weights and hands the data's shape over as a value."""
    from dreambooth_pl.module import DreamBoothLoRA

    module = DreamBoothLoRA(base_model=tiny_base, perf=AUTO)
    module.configure_model()  # no trainer: the CPU, so the manual switches
    assert switches(module.perf) == ("off", False, False, 1, False, False, False)
    weights = mp.frozen_gib(module.unet)
    got = mp.resolve_perf(AUTO, LoraSettings(), DataShape(64, 2), dataclasses.replace(H200, free_gib=weights + 1),
                          weights)
    assert got.fused_lora  # tiny activations at 64²: the fastest plan fits


@pytest.mark.parametrize("budget", [139.0, 15.0, 16.0])
def test_the_steps_estimate_follows_the_chosen_plan(budget):
    """``activations_gib`` reads the planned switches back to the measured plan they came from."""
    got = mp.resolve_perf(AUTO, LoraSettings(), DataShape(1024, 2), dataclasses.replace(H200, free_gib=budget), 5.06)
    plan = mp.choose(5.06, 1024, 2, budget, True)
    assert mp.activations_gib(got, 1024, 2) == plan.activations_gib
    assert mp.activations_gib(got, 512, 2) == pytest.approx(plan.activations_gib / 4)


def test_the_steps_estimate_takes_the_fused_plan_only_with_every_fused_switch_under_mixed_precision():
    """One fused switch alone is not the measured fused plan (its memory is the unfused one's), and outside mixed
    precision, where no plan was measured, the estimate doubles."""
    fused, plain = mp.PLANS[0], mp.PLANS[1]
    every = dict(gradient_checkpointing=False, fused_lora=True, fused_blocks=True, group_qkv=True)
    assert mp.activations_gib(PerfSettings(**every), 1024, 2) == fused.activations_gib
    assert mp.activations_gib(PerfSettings(**dict(every, group_qkv=False)), 1024, 2) == plain.activations_gib
    assert mp.activations_gib(PerfSettings(**every), 1024, 2, half=False) == 2 * plain.activations_gib


@pytest.mark.parametrize("free,budget,stays", [
    (60.0, None, True),  # an 80 GB card: 10 GiB held, 9.3 GiB of fused steps' activations
    (12.0, None, False),  # the steps' estimate and the encoders do not fit the headroom
    (60.0, 15.0, False),  # a budget caps what the run may hold, whatever the card has free
])
def test_the_encoders_stay_on_the_gpu_only_beside_the_plans_peak(free, budget, stays):
    """After caching, the text encoders and VAE stay on the GPU only where the run's resident memory plus the
    chosen plan's activations fit (free memory or ``memory_budget_gib``) less the plan's headroom."""
    perf = dataclasses.replace(mp.resolve_perf(AUTO, LoraSettings(), DataShape(1024, 2), H200, 5.06),
                               memory_budget_gib=budget)  # as configure_model plans it
    assert mp.room_for_encoders(perf, DataShape(1024, 2), 10.0, free, half=True) is stays
