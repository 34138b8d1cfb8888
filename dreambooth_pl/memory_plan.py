"""``model.perf.memory_plan: auto``: the fastest checkpointing / CUDA-graph / caching plan that fits the GPU's memory.

Each plan's activation memory was measured on the real training path (BENCHMARKS.md, "Memory plans": full-size SDXL
UNet, 1024², one instance + one prior image, rank 4, 16-mixed, whole-run peak reserved minus the frozen weights).
A run's estimate is its own frozen weights (counted from the loaded models) plus the plan's activations scaled by
pixels and images per step; the fastest plan whose estimate fits the budget wins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2**30


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
    """

    name: str
    checkpoint_every: int
    cuda_graph: bool
    activations_gib: float
    s_per_step: float


# fastest first; measured 2026-11-30 on one H200 (BENCHMARKS.md "Memory plans": whole-run peak reserved minus the
# 5.06 GiB resident at the steady state's start; benchmark --preset recipe with overrides)
PLANS = (
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


def choose(weights_gib: float, resolution: int, images: int, budget_gib: float, graph_allowed: bool) -> Plan:
    """The fastest plan whose estimate fits ``budget_gib``.

    Args:
        weights_gib: frozen weights + adapters + optimizer state resident during the steps.
        resolution: training side in pixels.
        images: images per step (instance + prior, times the batch size).
        budget_gib: memory the run may use (``model.perf.memory_budget_gib`` or the GPU's free memory).
        graph_allowed: the run can replay a CUDA graph (see ``model.perf.cuda_graph``); else the same checkpointing
            runs eagerly (the capture measured no more memory than the eager step).
    """
    plans = [p if graph_allowed else Plan(p.name.replace("CUDA graph", "eager"), p.checkpoint_every, False,
                                          p.activations_gib, p.s_per_step) for p in PLANS]
    for plan in plans:
        if estimate(plan, weights_gib, resolution, images) <= budget_gib:
            return plan
    need = ", ".join(f"{p.name}: {estimate(p, weights_gib, resolution, images):.1f} GiB" for p in plans)
    raise MemoryPlanError(f"model.perf.memory_plan=auto: no plan fits {budget_gib:.1f} GiB ({need}). Lower "
                          "data.resolution or data.batch_size, train without model.lora.train_text_encoder, or raise "
                          "model.perf.memory_budget_gib if the GPU has more free memory.")


def budget(device: torch.device, requested: float | None, margin_gib: float = 0.5) -> float:
    """The memory a run may plan for: ``requested``, capped by what the GPU has free now (less a margin for the
    CUDA context and allocator rounding)."""
    free, _ = torch.cuda.mem_get_info(device)
    available = free / GIB - margin_gib
    return available if requested is None else min(requested, available)


def auto_speed(module) -> dict:
    """``memory_plan: auto``'s speed switches for a configured ``DreamBoothLoRA`` on its trainer's device; off a
    CUDA device, a warning and the manual switches (``module.speed``)."""
    from lightning.pytorch.utilities import rank_zero_warn

    trainer = module._trainer
    device = trainer.strategy.root_device if trainer is not None else module.device
    if device.type != "cuda":
        rank_zero_warn(f"model.perf.memory_plan=auto plans GPU memory; on {device.type} the manual switches apply.")
        return module.speed
    dm = getattr(trainer, "datamodule", None)
    return plan_speed(module, device, dm.hparams if dm is not None else None)


def plan_speed(module, device: torch.device, data=None) -> dict:
    """The speed switches ``memory_plan: auto`` sets for a configured ``DreamBoothLoRA`` (before it moves to
    ``device``); logs the choice.

    Args:
        module: the LightningModule, its models loaded and adapters injected.
        device: the CUDA device it will train on.
        data: the data module's hyper-parameters (resolution, batch size, prior preservation); None: 1024², 1+1.
    """
    from lightning.pytorch.utilities import rank_zero_info

    lora, perf = module.hparams.lora, module.hparams.perf
    # pivotal tuning (model.pivotal) needs the text encoders and prompt gradients, as text-encoder LoRA does
    text_trains = lora.train_text_encoder or module.hparams.get("pivotal") is not None
    resolution = data["resolution"] if data is not None else 1024
    images = (data["batch_size"] if data is not None else 1) * (
        2 if data is None or data["with_prior_preservation"] else 1)
    cache = "latents" if text_trains else "all"  # leanest and fastest: the encoders leave the GPU
    resident = [module.unet] + ([module.text_encoder, module.text_encoder_2] if cache == "latents" else [])
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    weights = frozen_gib(*resident) + trainable * 16 / GIB  # fp32 weight, gradient and two Adam moments
    limit = budget(device, perf.memory_budget_gib)
    plan = choose(weights, resolution, images, limit, not (text_trains or lora.dropout > 0
                                                            or perf.compile_blocks))
    rank_zero_info(f"memory plan: {plan.name}, cache={cache} (estimated "
                   f"{estimate(plan, weights, resolution, images):.1f} GiB of {limit:.1f} GiB)")
    return {"cache": cache, "cuda_graph": plan.cuda_graph, "checkpoint_every": plan.checkpoint_every}
