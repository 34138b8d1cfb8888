"""``model.perf.memory_plan: auto``: the fastest checkpointing / CUDA-graph / caching / kernel plan that fits the GPU's
memory, and :func:`resolve_perf`, the one place that turns ``PerfSettings`` into the switches a run uses.

Each plan's activation memory was measured on the real training path (BENCHMARKS.md, "Memory plans": full-size SDXL
UNet, 1024², one instance + one prior image, rank 4, mixed precision, whole-run peak reserved minus the frozen
weights). A run's estimate is its own frozen weights (counted from the loaded models) plus the plan's activations
scaled by pixels and images per step; the fastest plan whose estimate fits the budget less a headroom wins.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .data.datamodule import DataShape
from .devices import free_gib
from .settings import LoraSettings, PerfSettings, graph_blockers

GIB = 2**30
# a plan must leave this share of the budget free: the measured peaks are single runs, and allocator fragmentation
# and caching transients vary by card (with it, a 15 GiB budget runs the 7 GiB plan, not the 13 GiB one)
HEADROOM = 0.15


class MemoryPlanError(ValueError):
    """No plan fits; the message says how much each needs and what to change."""


@dataclass(frozen=True)
class Plan:
    """One setting of the speed/memory switches, with its measured cost at the reference size.

    Args:
        name: shown in the log.
        checkpoint_every: gradient checkpointing of every k-th block (0: off).
        cuda_graph: replay the UNet step from a CUDA graph (only where the run allows it).
        activations_gib: peak activation memory at 1024², 2 images per step (measured).
        s_per_step: measured step time on one H200 at that size (ordering and the log only).
        fused: with the fused kernels (``fused_lora``, ``group_qkv``, ``fused_blocks``): only under mixed
            precision, where ``fused_blocks`` drops autocast's fp32 norm outputs (its activations were measured so).
    """

    name: str
    checkpoint_every: int
    cuda_graph: bool
    activations_gib: float
    s_per_step: float
    fused: bool = False


# fastest first; measured 2026-11-30 on one H200 (BENCHMARKS.md "Memory plans": whole-run peak reserved minus the
# 5.06 GiB resident at the steady state's start; benchmark --preset recipe with overrides; the fused plan is
# configs/perf/fast.yaml: 14.32 GiB whole-run peak, 0.100 s/step, session 6 call 4)
PLANS = (
    Plan("no checkpointing, fused kernels, CUDA graph", 0, True, 9.26, 0.100, fused=True),
    Plan("no checkpointing, CUDA graph", 0, True, 14.2, 0.226),
    Plan("every 2nd block recomputed, CUDA graph", 2, True, 8.0, 0.239),
    Plan("every block recomputed, CUDA graph", 1, True, 2.1, 0.287),
)
REFERENCE_PIXELS, REFERENCE_IMAGES = 1024 * 1024, 2


def frozen_gib(*models: torch.nn.Module) -> float:
    """GiB of the parameters and buffers of the models that stay on the GPU during the steps."""
    return sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers())) / GIB


def estimate(plan: Plan, weights_gib: float, resolution: int, images: int) -> float:
    """Estimated whole-run peak (GiB) of ``plan`` for a run with ``weights_gib`` resident, at this size."""
    scale = resolution * resolution / REFERENCE_PIXELS * images / REFERENCE_IMAGES
    return weights_gib + plan.activations_gib * scale


def activations_gib(perf: PerfSettings, resolution: int, images: int, half: bool = True) -> float:
    """Estimated activation peak (GiB) of the steps under the switches ``perf`` holds (resolved or manual): the
    measured plan with the same checkpointing (the fused plan only with all three fused switches on), else the
    largest with that checkpointing; doubled outside mixed precision (``half``), where every plan was measured."""
    every = perf.checkpoint_every if perf.gradient_checkpointing else 0
    fused = half and all((perf.fused_lora, perf.fused_blocks, perf.group_qkv))
    same = [p for p in PLANS if p.checkpoint_every == every] or list(PLANS)
    plan = next((p for p in same if p.fused == fused), max(same, key=lambda p: p.activations_gib))
    return estimate(plan, 0.0, resolution, images) * (1 if half else 2)


def room_for_encoders(perf: PerfSettings, shape: DataShape, held_gib: float, free: float, half: bool) -> bool:
    """Whether the encoders (already on the GPU) may stay there through the steps: the resident memory plus the
    plan's activation estimate fit the free memory (or ``memory_budget_gib``) less :data:`HEADROOM`. Staying saves
    their trip to the host (1.3 s of a 21-image cache on an H100, BENCHMARKS.md 2026-12-06, session 2), and
    in-training sampling and the held-out loss find them on the GPU.

    Args:
        perf: the switches in force.
        shape: the run's resolution and images per step.
        held_gib: what the run holds on the GPU now (weights, adapters and encoders).
        free: the GPU's free memory (GiB).
        half: mixed precision (the plans' activations were measured there).
    """
    limit = held_gib + free - 0.5  # less the margin :func:`budget` keeps for the context and rounding
    if perf.memory_budget_gib is not None:
        limit = min(limit, perf.memory_budget_gib)
    return held_gib + activations_gib(perf, shape.resolution, shape.images, half) <= limit * (1 - HEADROOM)


def choose(weights_gib: float, resolution: int, images: int, budget_gib: float, graph_allowed: bool,
           plans: tuple[Plan, ...] = PLANS) -> Plan:
    """The fastest of ``plans`` whose estimate fits ``budget_gib`` less :data:`HEADROOM`.

    Args:
        weights_gib: frozen weights + adapters + optimizer state resident during the steps.
        resolution: training side in pixels.
        images: images per step (instance + prior, times the batch size).
        budget_gib: memory the run may use (``model.perf.memory_budget_gib`` or the GPU's free memory).
        graph_allowed: the run can replay a CUDA graph (``settings.graph_blockers``); else the same checkpointing
            runs eagerly (the capture measured no more memory than the eager step).
        plans: the candidates, fastest first.
    """
    plans = [p if graph_allowed else dataclasses.replace(p, name=p.name.replace("CUDA graph", "eager"),
                                                         cuda_graph=False) for p in plans]
    usable = budget_gib * (1 - HEADROOM)
    for plan in plans:
        if estimate(plan, weights_gib, resolution, images) <= usable:
            return plan
    need = ", ".join(f"{p.name}: {estimate(p, weights_gib, resolution, images):.1f} GiB" for p in plans)
    raise MemoryPlanError(f"model.perf.memory_plan=auto: no plan fits {budget_gib:.1f} GiB less {HEADROOM:.0%} "
                          f"headroom ({need}). Lower data.resolution or data.batch_size, train without "
                          "model.lora.train_text_encoder, or raise model.perf.memory_budget_gib if the GPU has more "
                          "free memory.")


def budget(device: torch.device, requested: float | None, margin_gib: float = 0.5, held_gib: float = 0.0) -> float:
    """The memory a run may plan for: ``requested``, capped by what the GPU has free now plus ``held_gib`` (the
    run's own weights already loaded there, which the estimate counts), less a margin for the CUDA context and
    allocator rounding."""
    available = free_gib(device) + held_gib - margin_gib
    return available if requested is None else min(requested, available)


@dataclass(frozen=True)
class Target:
    """Where a run trains, as :func:`resolve_perf` needs it.

    Args:
        type: the device type (``cuda``, ``cpu``, ...).
        free_gib: memory the run may plan for (``budget``); None off a GPU.
        half: mixed precision (16 or bf16): the fused kernels' plan is measured only there.
    """

    type: str = "cpu"
    free_gib: Optional[float] = None
    half: bool = False


def manual(perf: PerfSettings) -> PerfSettings:
    """``perf`` with every unset switch off (what ``memory_plan: manual`` and a CPU run use)."""
    unset = {"gradient_checkpointing": False, "checkpoint_every": 1, "cache": "off", "cuda_graph": False,
             "fused_lora": False, "fused_blocks": False, "group_qkv": False, "fused_norms": False,
             "channels_last": False}
    return dataclasses.replace(perf, **{k: v for k, v in unset.items() if getattr(perf, k) is None})


def _allows(plan: Plan, perf: PerfSettings) -> bool:
    """The plan keeps every switch the user set: explicit settings always win (``cuda_graph: false`` turns every
    plan eager in :func:`choose`, with the same memory)."""
    every = plan.checkpoint_every
    fused = ("fused_lora", "fused_blocks", "group_qkv")
    return ((perf.gradient_checkpointing is None or perf.gradient_checkpointing == bool(every))
            and (perf.checkpoint_every is None or not every or perf.checkpoint_every == every)
            and (not plan.fused or all(getattr(perf, k) is not False for k in fused)))


def _candidates(perf: PerfSettings, fusable: bool) -> tuple[Plan, ...]:
    """The plans that keep the user's switches (the fused one only where the run can fuse), fastest first."""
    plans = tuple(p for p in PLANS if _allows(p, perf) and (not p.fused or fusable))
    if not plans:  # the user fixed a checkpointing the plans do not measure: plan with the nearest one's memory
        every = (perf.checkpoint_every or 1) if perf.gradient_checkpointing else 0
        near = min(PLANS, key=lambda p: abs(p.checkpoint_every - every) + 9 * p.fused)
        plans = (dataclasses.replace(near, name=f"checkpoint_every={every} as given", checkpoint_every=every),)
    return plans


def resolve_perf(perf: PerfSettings, lora: LoraSettings, shape: DataShape, target: Target, weights_gib: float = 0.0,
                 log: Optional[Callable[[str], None]] = None, base_dtype: str = "float16",
                 storage_gib: Optional[dict[str, float]] = None, pivotal: bool = False) -> PerfSettings:
    """The switches a run uses: ``perf`` as given (``manual``, or off a GPU), or with ``memory_plan: auto`` the
    fastest plan whose estimate fits ``target.free_gib``, keeping every switch the user set.

    Args:
        perf: the run's settings (``model.perf``).
        lora: the adapters (text-encoder LoRA keeps the text encoders: ``cache: latents``; dropout rules out a graph).
        shape: the data's resolution and images per step.
        target: the device, its free memory and whether the run is mixed precision.
        weights_gib: frozen weights, adapters and optimizer state resident during the steps (auto only).
        log: called with one line saying what ``auto`` picked and why.
        base_dtype: ``model.base_dtype``: on a quantized base the fused LoRA node keeps peft's forward
            (fused_lora.py fuses plain ``nn.Linear`` bases only), so the fused plan's measured memory does not hold.
        storage_gib: ``weights_gib`` with the UNet stored as float8 / nf4 instead (``quant.storage_gib``); the log
            line and the no-plan-fits error name a storage that would allow a faster plan. The plan never
            switches the storage itself: rounding the base changes the maths, which ``model.perf`` must not.
        pivotal: ``model.pivotal`` is set: its token rows train through the text encoders, which therefore stay
            (``cache: latents``) and feed prompt embeddings that need gradients (no CUDA graph).
    """
    if perf.memory_plan == "manual" or target.type != "cuda":
        return manual(perf)
    from .quant import storage_hint

    text_trains = lora.train_text_encoder or pivotal
    cache = perf.cache or ("latents" if text_trains else "all")  # "all": the encoders leave the GPU
    graph = not graph_blockers(lora, perf, pivotal) and perf.cuda_graph is not False
    plans = _candidates(perf, target.half and base_dtype == "float16")

    def fit(weights: float, plans: tuple[Plan, ...] = plans) -> Plan:
        return choose(weights, shape.resolution, shape.images, target.free_gib, graph, plans)

    def fit_quantized(weights: float) -> Plan:  # the plans open to a float8/nf4 base (no fused one)
        return fit(weights, _candidates(perf, False))

    try:
        plan = fit(weights_gib)
    except MemoryPlanError as e:
        raise MemoryPlanError(f"{e} {storage_hint(storage_gib or {}, fit_quantized)}".strip()) from None
    plain = lora.adapter == "lora" and lora.dropout == 0  # the fused node runs plain LoRA; others keep peft's path
    fused = plan.fused and plain
    from .fused_norms import uses_kernel

    kernels = uses_kernel(torch.device("cuda"))
    # the Triton GroupNorms on the fused plan, and NHWC with them wherever they run (without the kernels NHWC copies
    # around every norm: slower)
    norms = (plan.fused and kernels) if perf.fused_norms is None else perf.fused_norms
    nhwc = (norms and kernels) if perf.channels_last is None else perf.channels_last
    chosen = dataclasses.replace(
        perf, cache=cache, gradient_checkpointing=bool(plan.checkpoint_every),
        checkpoint_every=plan.checkpoint_every or 1, cuda_graph=plan.cuda_graph,
        fused_lora=fused if perf.fused_lora is None else perf.fused_lora,
        fused_blocks=plan.fused if perf.fused_blocks is None else perf.fused_blocks,
        group_qkv=fused if perf.group_qkv is None else perf.group_qkv,
        fused_norms=norms, channels_last=nhwc)
    if log is not None:
        why = f"estimated {estimate(plan, weights_gib, shape.resolution, shape.images):.1f} GiB of " \
              f"{target.free_gib:.1f} GiB less {HEADROOM:.0%} headroom"
        faster = ", ".join(p.name for p in PLANS if p.s_per_step < plan.s_per_step and p not in plans)
        log(f"memory plan: {plan.name}, cache={cache} ({why}"
            + (f"; faster plans ruled out by your settings, precision or base_dtype: {faster}" if faster else "")
            + "; model.perf.* values you set always win)"
            + (f". {hint}" if (hint := storage_hint(storage_gib or {}, fit_quantized, plan)) else ""))
    return manual(chosen)
