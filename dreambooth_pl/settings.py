"""The model's settings in typed groups (``model.lora``, ``model.optim``, ``model.ema``, ``model.perf``).

Each group checks its own values when it is built, with messages that name the full config key, so a bad value
stops the run before any model loads; :func:`check_model` checks what spans groups. Values that define the recipe
itself (base, loss weights, noise, seed) stay top-level arguments of :class:`~dreambooth_pl.module.DreamBoothLoRA`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from . import perf as perf_lib
from .adapter import kinds
from .optimizers import OptimizerName


def require(ok: bool, key: str, want: str, value: Any) -> None:
    """Raise ``<key> must be <want>, got <value>`` unless ``ok``; ``key`` is the full config key (the data groups'
    checks use it too)."""
    if not ok:
        raise ValueError(f"{key} must be {want}, got {value!r}")


def _require(ok: bool, key: str, want: str, value: Any) -> None:
    """:func:`require` of ``model.<key>``."""
    require(ok, f"model.{key}", want, value)


@dataclass(frozen=True)
class LoraSettings:
    """The trainable adapters: their type, size and where they go.

    Args:
        adapter: ``lora``, ``dora``, ``lokr`` or ``loha`` (adapter/kinds.py); rank, alpha, targets and init apply to
            every type.
        rank: adapter rank.
        alpha: adapter alpha (None: equal to the rank, scale 1).
        dropout: dropout on the adapter input (LoRA and DoRA only).
        target_modules: UNet module-name suffixes to adapt (default: attention projections).
        init: peft ``init_lora_weights``: ``gaussian`` (diffusers' script), ``true`` (peft's Kaiming uniform), any
            other peft init by name; false starts B non-zero (tests assert the adapter's effect).
        train_text_encoder: also train adapters on both text encoders (q/k/v/out projections).
    """

    adapter: kinds.AdapterType = "lora"
    rank: int = 4
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(kinds.UNET_TARGETS))
    init: Union[bool, str] = "gaussian"
    train_text_encoder: bool = False

    def __post_init__(self) -> None:
        _require(self.alpha is None or self.alpha > 0, "lora.alpha", "> 0 or null (the rank)", self.alpha)
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "in [0, 1)", self.dropout)
        _require(len(self.target_modules) > 0, "lora.target_modules", "a non-empty list", self.target_modules)
        kinds.check_settings(self.adapter, self.dropout, self.rank)


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and learning-rate schedule of the adapters.

    Args:
        name: ``adamw``, ``adamw8bit`` (bitsandbytes; needs a CUDA GPU, else AdamW with a warning) or ``prodigy``
            (d-adaptation, prodigyopt; its step-size estimate is logged as ``train/prodigy_d_lr``).
        learning_rate: learning rate of the UNet adapters (Prodigy: a multiplier of its estimate, 1.0).
        weight_decay: decoupled weight decay of the UNet adapters.
        text_encoder_lr: learning rate of the text-encoder adapters (None: ``learning_rate``; 5e-6 is diffusers'
            ``--text_encoder_lr``).
        text_encoder_weight_decay: decoupled weight decay of the text-encoder adapters (diffusers'
            ``--adam_weight_decay_text_encoder``).
        scheduler: diffusers schedule name (constant, constant_with_warmup, linear, cosine, ...).
        warmup_steps: linear warm-up steps.
        adam_betas: the moment decays of AdamW, AdamW8bit and Prodigy (diffusers' ``--adam_beta1/2``).
        adam_epsilon: their denominator's epsilon (diffusers' ``--adam_epsilon``). A gradient component near it
            moves by a fraction of a step that depends on its last bits.
    """

    name: OptimizerName = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    text_encoder_lr: Optional[float] = 5e-6
    text_encoder_weight_decay: float = 1e-3
    scheduler: str = "constant"
    warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8

    def __post_init__(self) -> None:
        _require(self.learning_rate > 0, "optim.learning_rate", "> 0", self.learning_rate)
        _require(self.text_encoder_lr is None or self.text_encoder_lr > 0, "optim.text_encoder_lr",
                 "> 0 or null (optim.learning_rate)", self.text_encoder_lr)
        _require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _require(self.text_encoder_weight_decay >= 0, "optim.text_encoder_weight_decay", ">= 0",
                 self.text_encoder_weight_decay)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        _require(all(0.0 <= b < 1.0 for b in self.adam_betas), "optim.adam_betas", "two values in [0, 1)",
                 list(self.adam_betas))
        _require(self.adam_epsilon > 0, "optim.adam_epsilon", "> 0", self.adam_epsilon)


@dataclass(frozen=True)
class EmaSettings:
    """An exponential moving average of the adapter weights (ema.py); sample grids and metrics then use it.

    Args:
        decay: weight of the old average per optimizer step (None: no average).
        export: with ``decay``, export the averaged weights (False: the raw ones).
    """

    decay: Optional[float] = None
    export: bool = True

    def __post_init__(self) -> None:
        _require(self.decay is None or 0.0 <= self.decay < 1.0, "ema.decay", "in [0, 1) or null (off)", self.decay)


@dataclass(frozen=True)
class PerfSettings:
    """Switches that change speed and memory, never the maths: a resumed run may change them (cli.check_resume).

    The switches ``memory_plan: auto`` may pick default to None (unset): ``auto`` fills them on a CUDA device, and
    ``manual`` (or a CPU) reads None as off (``cache: off``, ``checkpoint_every: 1``). A value given always wins.
    ``memory_plan.resolve_perf`` turns these settings into the ones a run uses, with no None left.

    Args:
        gradient_checkpointing: recompute UNet activations in backward (less memory, ~30% slower).
        checkpoint_every: with ``gradient_checkpointing``, 1 recomputes every block (diffusers' own), k > 1 only
            every k-th transformer/resnet block (between the two in memory and speed).
        cache: pre-encode inputs before the first step and free their encoders from the GPU: ``latents`` (VAE
            latents of every image, plain and mirrored; frees the VAE) or ``all`` (also the prompts' text
            embeddings; frees both text encoders; refused with ``lora.train_text_encoder``). See data/cache.py.
        compile_blocks: ``torch.compile`` each repeated block (regional compilation; see perf.py).
        compile_regions: class names of the blocks ``compile_blocks`` compiles.
        compile_mode: ``torch.compile`` mode (None: default; ``reduce-overhead`` adds CUDA graphs).
        channels_last: NHWC memory format for the UNet's convolutions (with ``fused_norms``, NHWC throughout;
            ``auto`` sets both on its fused plan where the Triton kernels run).
        attention: scaled-dot-product attention kernel (``auto`` lets PyTorch choose).
        cuda_graph: replay the UNet's forward and backward from a CUDA graph (graphs.py): the step stops being
            bound by Python launching ~10k small adapter kernels. Needs a CUDA device, frozen text encoders, no
            adapter dropout and no ``compile_blocks`` (:func:`graph_blockers`); on a CPU it is ignored with a warning.
        memory_plan: ``manual`` uses the switches above as given; ``auto`` picks the unset ones on a CUDA device:
            the fastest measured plan whose estimate fits the budget (memory_plan.py), and fails naming every
            plan's need when none does.
        memory_budget_gib: GiB that ``auto`` may plan for (None: the GPU's free memory; 15 plans a 16 GB card's
            run on a bigger card).
        fused_lora: run each plain-LoRA projection and its frozen layer as one autograd node with in-place
            up-projections (fused_lora.py: fewer kernels, the same numbers as peft's path; on in ``fast.yaml``);
            DoRA, LoKr, LoHa and adapter dropout keep peft's forward.
        fused_blocks: under mixed precision, run the UNet's frozen LayerNorms and GroupNorms in the half dtype
            instead of autocast's fp32 round trip, and each GEGLU activation as one compiled kernel on CUDA
            (block_ops.py: fewer, vectorised passes over the activations; on in ``fast.yaml``).
        group_qkv: with ``fused_lora``, compute each self-attention's q, k and v adapters in one node (one
            down-projection GEMM on ``[A_q; A_k; A_v]`` and one for its gradient), and each cross-attention's k and
            v on the text states (fused_lora.py; fewer kernels).
        fused_norms: run the UNet's frozen GroupNorms as Triton kernels, each resnet's ``+ temb``, norm and SiLU
            as one node forward and backward (fused_norms.py, on CUDA with Triton; elsewhere diffusers' ops), the
            VAE's too while it encodes the cache (its latent-store entries key apart), and
            with ``channels_last`` keep NHWC through the norms instead of copying to NCHW and back. Both on: the
            recipe 0.092 against 0.102 s/step, ``fast`` 0.093 against 0.102 (one H100 call, BENCHMARKS.md 2026-12-07
            session 8).
        warm_kernels: build the step's Triton kernels (fused norms, GEGLU) on a thread while the cache encodes,
            instead of one by one inside the first step on a machine that has not built them before
            (kernel_warmup.py); the same kernels run either way.
    """

    gradient_checkpointing: Optional[bool] = None
    checkpoint_every: Optional[int] = None
    cache: Optional[Literal["off", "latents", "all"]] = None
    compile_blocks: bool = False
    compile_regions: list[str] = field(default_factory=lambda: list(perf_lib.BLOCKS))
    compile_mode: Optional[str] = None
    channels_last: Optional[bool] = None
    attention: perf_lib.Attention = "auto"
    cuda_graph: Optional[bool] = None
    memory_plan: Literal["manual", "auto"] = "manual"
    memory_budget_gib: Optional[float] = None
    fused_lora: Optional[bool] = None
    fused_blocks: Optional[bool] = None
    group_qkv: Optional[bool] = None
    fused_norms: Optional[bool] = None
    warm_kernels: bool = True

    def __post_init__(self) -> None:
        _require(self.checkpoint_every is None or self.checkpoint_every >= 1, "perf.checkpoint_every",
                 ">= 1 (turn checkpointing off with model.perf.gradient_checkpointing: false)", self.checkpoint_every)
        _require(self.cache in (None, "off", "latents", "all"), "perf.cache", "off, latents or all", self.cache)
        _require(self.memory_plan in ("manual", "auto"), "perf.memory_plan", "manual or auto", self.memory_plan)
        _require(self.memory_budget_gib is None or self.memory_budget_gib > 0, "perf.memory_budget_gib",
                 "> 0 or null", self.memory_budget_gib)
        fused_possible = self.fused_lora or (self.fused_lora is None and self.memory_plan == "auto")
        _require(not self.group_qkv or fused_possible, "perf.group_qkv",
                 "false unless model.perf.fused_lora is true (it groups the fused nodes)", self.group_qkv)


def graph_blockers(lora: LoraSettings, perf: PerfSettings, pivotal: bool = False) -> list[str]:
    """The config keys that rule out replaying the UNet step from a CUDA graph (empty: a graph is allowed): text
    embeddings that need gradients, random dropout masks, or compiled code inside the capture. The one statement of
    the rule: :func:`check_model` refuses ``cuda_graph: true`` with it (``pivotal.check_pivotal`` for
    ``model.pivotal``), and ``memory_plan: auto`` plans with it.

    Args:
        lora: the adapter settings.
        perf: the speed switches.
        pivotal: ``model.pivotal`` is set (its new token rows need the prompt embeddings' gradients).
    """
    return [key for key, on in (("model.lora.train_text_encoder", lora.train_text_encoder),
                                ("model.pivotal", pivotal),
                                ("model.lora.dropout", lora.dropout > 0),
                                ("model.perf.compile_blocks", perf.compile_blocks)) if on]


def check_model(lora: LoraSettings, perf: PerfSettings, noise_offset: float, snr_gamma: Optional[float]) -> None:
    """Refuse the top-level recipe values and the combinations of groups that cannot work.

    Args:
        lora: the adapter settings.
        perf: the speed switches.
        noise_offset: offset-noise strength (>= 0).
        snr_gamma: min-SNR-gamma (> 0 or None).
    """
    _require(noise_offset >= 0, "noise_offset", ">= 0", noise_offset)
    _require(snr_gamma is None or snr_gamma > 0, "snr_gamma", "> 0 or null", snr_gamma)
    if perf.cache == "all" and lora.train_text_encoder:
        raise ValueError("model.perf.cache=all pre-computes the text embeddings once and frees the text encoders, "
                         "but model.lora.train_text_encoder=true trains adapters on those encoders, so their "
                         "embeddings change every step. Use model.perf.cache=latents (caches only the VAE latents "
                         "and frees the VAE) or set model.lora.train_text_encoder=false.")
    if perf.cuda_graph:
        clash = graph_blockers(lora, perf)
        if clash:
            raise ValueError(f"model.perf.cuda_graph replays a fixed UNet call, which {clash[0]} breaks (text "
                             "embeddings that need gradients, random dropout masks, or compiled code in the "
                             f"capture). Turn {clash[0]} off, or set model.perf.cuda_graph: false.")


def plain(hparams: dict) -> dict:
    """``hparams`` with every settings group as a plain dict: what a checkpoint stores (``weights_only`` loading
    reads plain data only) and what :func:`~dreambooth_pl.moved_keys.nest_hparams` reads back."""
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for k, v in hparams.items()}
