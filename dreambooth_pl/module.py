"""The LightningModule: frozen SDXL + trainable LoRA, wired to the loss, noise and prompt encoding modules."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import kernel_warmup
from . import perf as perf_lib
from . import quant
from .adapter.checkpoint import check_adapter_keys
from .adapter.files import save_adapter
from .data.cache import CACHE_IMAGES_PER_CALL, Encoders
from .devices import free_gib
from .fused_lora import half_adapters
from .graphs import GraphedCall
from .loss import DreamBoothLoss, latent_weights
from .memory_plan import manual, room_for_encoders
from .model_setup import adapted_encoders, apply_perf, load_model, plan_perf
from .noise import NoiseSchedule, example_id
from .optimizers import build_optimizer, clip_gradients, step_size_estimates
from .pivotal import PivotalSettings, PivotalTokens, check_identifier, check_pivotal, pivotal_encode, total_steps
from .sdxl import PromptCache, add_time_ids, dtype_name, encode_prompts, scale_latents, tokenize
from .settings import EmaSettings, LoraSettings, OptimSettings, PerfSettings, check_model, plain


class DreamBoothLoRA(L.LightningModule):
    """DreamBooth with prior preservation (Ruiz et al. 2023) on SDXL, training adapters only.

    Args:
        base_model: SDXL pipeline folder or hub id.
        vae_model: optional separate VAE folder (e.g. the fp16-fix VAE).
        vae_dtype: dtype the VAE encodes in (``auto``: bf16 on a GPU that has it, else fp32; sdxl.vae_dtype_on);
            float16 is refused because the SDXL VAE overflows in it.
        prior_loss_weight: weight of the class-prior term.
        snr_gamma: min-SNR-gamma loss weighting (None: off; 5.0 is the paper's value).
        noise_offset: offset-noise strength (0: off).
        seed: seed of per-step noise and timesteps (linked from ``seed_everything``).
        random_base: build a random-weight base of this preset at ``base_model`` if that folder does not exist
            (smoke runs, tests and benchmarks on machines without the real weights).
        base_dtype: storage of the UNet's frozen linears: ``float16`` (the trainer's dtype), ``float8`` (e4m3 with
            per-channel scales, upcast per layer) or ``nf4`` (bitsandbytes); adapters stay fp32 (quant.py).
        lora: the adapters: type, rank, alpha, dropout, targets, init, text encoders (settings.LoraSettings).
        optim: optimizer, learning rates, weight decays and schedule (settings.OptimSettings).
        ema: moving average of the adapter weights (settings.EmaSettings).
        perf: speed and memory switches (settings.PerfSettings).
        pivotal: new identifier tokens trained in both text encoders (pivotal.PivotalSettings; None: off).
    """

    def __init__(self, base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
                 vae_model: Optional[str] = None, vae_dtype: Literal["float32", "bfloat16", "auto"] = "float32",
                 prior_loss_weight: float = 1.0, snr_gamma: Optional[float] = None, noise_offset: float = 0.0,
                 seed: int = 0, random_base: Optional[Literal["tiny", "sdxl"]] = None,
                 base_dtype: quant.BaseDtype = "float16",
                 lora: LoraSettings = LoraSettings(), optim: OptimSettings = OptimSettings(),
                 ema: EmaSettings = EmaSettings(), perf: PerfSettings = PerfSettings(),
                 pivotal: Optional[PivotalSettings] = None):
        super().__init__()
        # LightningCLI (to save_hyperparameters) and load_from_checkpoint hand the groups over as plain dicts
        groups = ((LoraSettings, lora), (OptimSettings, optim), (EmaSettings, ema), (PerfSettings, perf))
        lora, optim, ema, perf = (g(**v) if isinstance(v, dict) else v for g, v in groups)
        pivotal = PivotalSettings(**pivotal) if isinstance(pivotal, dict) else pivotal
        self.save_hyperparameters()  # the groups are frozen dataclasses: their shared defaults cannot change
        self.hparams.update(lora=lora, optim=optim, ema=ema, perf=perf, pivotal=pivotal)
        check_model(lora, perf, noise_offset, snr_gamma)
        quant.check_base_dtype(base_dtype)
        check_pivotal(pivotal, lora.train_text_encoder, perf.cache, perf.cuda_graph)
        self.pivotal: Optional[PivotalTokens] = None  # the new tokens, made with the models in configure_model
        self.loss_fn = DreamBoothLoss(prior_loss_weight)  # validates the weight before any model loads
        self.unet = None
        self._graphed = None
        self.graph_stats: dict[str, int] = {}  # replays and eager fallbacks of the last fit's CUDA graph
        self.timings: dict[str, float] = {}  # seconds of configure_model's parts (the fit summary's start split)
        # the switches in force (memory_plan.resolve_perf): unset ones off until configure_model plans the GPU
        self.perf: PerfSettings = manual(perf)
        self.ema = None  # AdapterEMA, built with the adapters in configure_model
        self._prompt_cache = PromptCache()
        self.strict_loading = False  # checkpoints hold only the trainable weights (see on_save_checkpoint)
        self._micro_batch = 0  # index within the accumulated step (on_train_batch_start)
        self._warmup: Optional[kernel_warmup.KernelWarmup] = None  # the step's kernels building (configure_model)
        self._builds: Optional[int] = None  # Triton's kernel count at the first step (on_train_start)
        from .validation import HeldOutLoss

        self.val_loss = HeldOutLoss(prior_loss_weight)  # the loss of data.photos.held_out; its sums hold no weights

    # ---- model set-up --------------------------------------------------------------------------------------
    def weight_dtype(self) -> torch.dtype:
        """Dtype of the frozen base: half under mixed precision (the T4 recipe), fp32 otherwise."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return {"16": torch.float16, "bf": torch.bfloat16}.get(precision[:2], torch.float32)

    def prepare_data(self) -> None:
        """Build the random base once per machine (local rank 0) before any process loads it."""
        if self.hparams.random_base:
            from .bases import build_random_base

            build_random_base(self.hparams.random_base, self.hparams.base_model)  # refuses folders not its own

    def configure_model(self) -> None:
        """Load the base and inject adapters (model_setup.py); Lightning calls this after the data is validated."""
        if self.unet is not None:  # loaded already: a base a prior draw left (base_handoff.py) has no taker
            from .base_handoff import release

            release()
            return
        hp = self.hparams
        if hp.pivotal is not None:
            check_identifier(hp.pivotal, self._trainer)
        dtype = self.weight_dtype()
        device = self._trainer.strategy.root_device if self._trainer else None
        t = time.perf_counter()
        m = load_model(hp, dtype, device)
        self.timings["load"] = time.perf_counter() - t
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = m.unet, m.vae, m.text_encoder, m.text_encoder_2
        self.tokenizers, self.scheduler_config, self.pivotal = m.tokenizers, m.scheduler_config, m.pivotal
        self.noise = NoiseSchedule(m.scheduler_config)
        adapted = adapted_encoders(m, hp.lora.train_text_encoder)
        # pivotal tuning keeps the text encoders on the GPU through the steps, as text-encoder LoRA does
        self.perf = plan_perf(self, adapted or ((m.text_encoder, m.text_encoder_2) if m.pivotal else ()))
        if hp.ema.decay is not None:
            from .ema import AdapterEMA

            self.ema = AdapterEMA(self.trainable_parameters(), hp.ema.decay)
        apply_perf(self.perf, self, adapted, dtype, hp.lora.dropout)
        if self.perf.warm_kernels and not self.perf.compile_blocks:  # (compiled blocks launch Inductor's kernels)
            images = kernel_warmup.train_images(getattr(self._trainer, "datamodule", None))
            self._warmup = kernel_warmup.start(self.unet, images, dtype, bool(self.perf.channels_last), device)
        perf_lib.ddp_ignore_frozen(self)
        self.timings["adapters"] = time.perf_counter() - t - self.timings["load"]

    def on_train_start(self) -> None:
        """Wait for the kernels building on a thread since ``configure_model`` (kernel_warmup.py): the first step
        launches them, and its CUDA graph captures them."""
        if self._warmup is not None:
            warmup, self._warmup = self._warmup, None
            self.timings["kernel_wait"] = warmup.join()
            self.timings["kernel_build"] = warmup.seconds
            if warmup.error:
                rank_zero_warn(f"building the step's Triton kernels ahead failed ({warmup.error}); each builds at "
                               "its first launch instead (set model.perf.warm_kernels: false to skip the attempt).")
        if self.device.type == "cuda":
            try:
                self._builds = kernel_warmup.built(self.device)  # the first step's own builds: on_train_batch_end
            except ImportError:  # no Triton: no kernel to count
                self._builds = None

    def on_fit_start(self) -> None:
        """With ``perf.cache``: hand the encoders to the data module, which encodes its images (and prompts) now;
        with less than 24 GiB free (or budgeted) the UNet waits on the CPU meanwhile and the VAE encodes one image
        per call (else four on a GPU, two in fp32); the encoders stay on the GPU afterwards only where the steps'
        planned peak leaves room for them."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.perf.cache == "off" or dm is None:
            return
        # the UNet waits on the CPU while the VAE encodes only where memory is short (the GPU's free memory, or
        # memory_budget_gib: a 15 GiB budget parks, measured 13.6 GiB setup peak without): the round trip costs seconds
        cuda = self.device.type == "cuda"
        room = free_gib(self.device) if cuda else 0.0
        short = cuda and min(room, self.perf.memory_budget_gib or room) < 24
        stay = cuda and not short and room_for_encoders(self.perf, dm.shape(), torch.cuda.memory_allocated(self.device)
                                                        / 2**30, room, half=self.weight_dtype() != torch.float32)
        # on a GPU with room, four images per VAE call (one 1024² image leaves the GPU a third idle); two where
        # the VAE runs in fp32, whose activations are twice as large
        per_call = CACHE_IMAGES_PER_CALL // (2 if self.vae.dtype == torch.float32 else 1) if cuda and not short else 1
        dm.cache_inputs(Encoders(self.vae, (self.text_encoder, self.text_encoder_2), self.tokenizers,
                                 park=(self.unet,) if short else (), one_per_call=short, images_per_call=per_call),
                        self.perf.cache, offload=not stay)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named parameters that train (the adapters)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def averaged_weights(self):
        """Context in which the adapters hold their EMA (``ema.decay``), or a no-op when EMA is off."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    # ---- encoders --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) in fp32, unscaled; encoded outside autocast in ``vae_dtype``
        so the SDXL VAE cannot overflow."""
        with torch.autocast(self.device.type, enabled=False):
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            return dist.mean.float(), dist.std.float()

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and pooled embeddings; cached per prompt while the text encoders are frozen (with
        ``pivotal``: the prompts without the new tokens, such as the class prompt)."""
        encoders = (self.text_encoder, self.text_encoder_2)
        if self.hparams.lora.train_text_encoder:
            return encode_prompts(encoders, [tokenize(t, prompts) for t in self.tokenizers])
        if self.pivotal is not None:
            return pivotal_encode(self.pivotal, [self.pivotal.rewrite(p) for p in prompts], self._encode_frozen,
                                  lambda ps: encode_prompts(encoders, [tokenize(t, ps) for t in self.tokenizers]))
        return self._encode_frozen(prompts)

    def _encode_frozen(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prompt_cache.encode((self.text_encoder, self.text_encoder_2), self.tokenizers, prompts)

    # ---- training --------------------------------------------------------------------------------------------
    def example_ids(self, batch: dict) -> list[int]:
        """The examples' stream-wide ids, which key their noise (``NoiseSchedule.draw``). The data streams set them;
        a batch built by hand numbers its examples from this micro-batch's place in the run, as one stream would."""
        if "example_id" in batch:
            return [int(i) for i in batch["example_id"]]
        t = self._trainer
        accumulate, world = (t.accumulate_grad_batches, t.world_size) if t is not None else (1, 1)
        n = len(batch["prompt"])
        first = ((self.global_step * accumulate + self._micro_batch) * world + self.global_rank) * n
        return [example_id(first + j, 0) for j in range(n)]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # global_step repeats over the accumulate_grad_batches micro-batches of a step; this tells them apart (for
        # dropout's seed, and the ids of hand-built batches)
        self._micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        if self.hparams.lora.dropout > 0:  # dropout draws from the global RNG: make it a function of the step too
            torch.manual_seed((self.hparams.seed + 7919 * self.global_step + 104729 * self.global_rank
                               + 15485863 * self._micro_batch) % 2**63)

    def forward_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (see :class:`DreamBoothLoss`), at each example's own draws: its latent sample
        (from the cached distribution, data/cache.py, or the VAE's), noise and timestep."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        else:
            mean, std = self.encode_moments(batch["pixel_values"])
        offset = self.hparams.noise_offset
        d = self.noise.draw(self.hparams.seed, self.example_ids(batch), tuple(mean.shape[1:]), latent_eps=True,
                            offset=bool(offset), device=self.device)
        latents = scale_latents(mean + std * d["eps"], self.vae.config)
        # offset noise (Guttenberg 2023): a per-channel constant shift
        noise = d["noise"] + offset * d["offset"] if offset else d["noise"]
        return self.loss_at(batch, latents, noise, d["t"])

    def loss_at(self, batch: dict, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Loss terms of ``batch`` at the given clean latents, noise and timesteps (training draws them per step;
        the held-out loss fixes them per photo, validation.py)."""
        noisy = self.noise.add_noise(latents, noise, t)
        if "prompt_embeds" in batch:
            prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            prompt_embeds, pooled = self.encode_text(batch["prompt"])
        # filled on the device: torch.tensor(list, device=cuda) is a blocking copy, a host sync every step
        size = torch.full((latents.shape[0], 2), latents.shape[-2] * 8, dtype=torch.long, device=self.device)
        size[:, 1] = latents.shape[-1] * 8
        time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], size).to(self.device)
        if self.perf.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        pred = self.unet_call()(noisy, t, prompt_embeds, pooled, time_ids)
        weights = self.noise.min_snr_weights(t, self.hparams.snr_gamma) if self.hparams.snr_gamma else None
        mask = latent_weights(batch["loss_mask"], latents.shape[-2:]) if "loss_mask" in batch else None
        return self.loss_fn(pred, self.noise.target(latents, noise, t), batch["is_prior"], weights, mask)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if self.pivotal is not None:
            self.pivotal.pivot(optimizer, self.global_step, total_steps(self.trainer))
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.pivotal is not None:  # the script's retract_embeddings, after every update
            self.pivotal.renormalise()
        if self.ema is not None:  # once per real optimizer step, before any callback samples at this step
            self.ema.update()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._builds is not None:  # Triton kernels the first step built at launch, which the warm-up missed
            self.timings["builds"], self._builds = kernel_warmup.built(self.device) - self._builds, None
        if batch_idx == 0 and isinstance(self._graphed, GraphedCall):  # the first step's capture (phases.json)
            self.timings.update({f"graph_{k}": v for k, v in self._graphed.seconds.items()})
        for name, value in step_size_estimates(self.trainer.optimizers[0]).items():
            self.log(name, value, batch_size=len(batch["prompt"]))

    def _unet(self, noisy, t, prompt_embeds, pooled, time_ids) -> torch.Tensor:
        """The UNet's noise prediction from positional tensors (the form a CUDA graph captures)."""
        half = self.perf.fused_lora and torch.is_autocast_enabled(self.device.type)
        with perf_lib.attention_context(self.perf.attention), \
                half_adapters(self.unet, self.weight_dtype()) if half else nullcontext():
            return self.unet(noisy, t, encoder_hidden_states=prompt_embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def unet_call(self):
        """The eager UNet call, or its CUDA-graph replay with ``perf.cuda_graph`` on a CUDA device."""
        if not self.perf.cuda_graph or not torch.is_grad_enabled():
            return self._unet
        if self.device.type != "cuda":
            if self._graphed is None:
                rank_zero_warn(f"model.perf.cuda_graph needs a CUDA device; the UNet runs eagerly on {self.device}.")
                self._graphed = self._unet
            return self._graphed
        if self._graphed is None:
            dtype = self.weight_dtype()
            self._graphed = GraphedCall(self._unet, [p for p in self.unet.parameters() if p.requires_grad],
                                        None if dtype == torch.float32 else dtype)
        return self._graphed

    def teardown(self, stage: str) -> None:
        # Lightning moves the module to the CPU after fit: a kept graph would replay stale parameter addresses
        if isinstance(self._graphed, GraphedCall):
            self.graph_stats = {"replays": self._graphed.replays, "fallbacks": self._graphed.fallbacks}
        self._graphed = None
        if self._warmup is not None:  # a fit that never trained (resumed when finished): no build left running
            self._warmup, warmup = None, self._warmup
            warmup.join()

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        terms = self.forward_loss(batch)
        n = len(batch["prompt"])
        for name in ("loss", "loss_instance", "loss_prior"):  # train/loss, train/loss_instance, train/loss_prior
            # no prog_bar: Lightning would turn it into a float after every batch, a host sync per step
            self.log(f"train/{name}", terms[name], batch_size=n)
        # every term reaches callbacks (FaultTolerance names the one that went non-finite, without a host sync)
        return {"loss": terms["loss"], **{k: v.detach() for k, v in terms.items() if k != "loss"}}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """One held-out photo (``data.photos.held_out``) at its fixed noise and timesteps (validation.py)."""
        self.val_loss.update(self, batch)

    def on_validation_epoch_end(self) -> None:
        # val/loss, val/loss_instance, val/loss_prior: the same keys and values on every rank (the sums were
        # reduced), so sync_dist only averages equal numbers
        for name, value in self.val_loss.compute().items():
            self.log(f"val/{name}", value, sync_dist=True)
        self.val_loss.reset()

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        o = self.hparams.optim
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": o.learning_rate, "weight_decay": o.weight_decay}]
        if self.hparams.lora.train_text_encoder:
            te = [p for m in (self.text_encoder, self.text_encoder_2) for p in m.parameters() if p.requires_grad]
            groups.append({"params": te, "lr": o.text_encoder_lr or o.learning_rate,
                           "weight_decay": o.text_encoder_weight_decay})
        if self.pivotal is not None:
            groups.append(self.pivotal.param_group())
        opt = build_optimizer(o.name, groups, o.weight_decay, self.device, tuple(o.adam_betas), o.adam_epsilon)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        sched = get_scheduler(o.scheduler, opt, num_warmup_steps=o.warmup_steps, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, fused AdamW under mixed precision included (optimizers.clip_gradients)."""
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the adapters: a checkpoint is megabytes, and the frozen base is reloaded from its folder."""
        trainable = self.trainable_parameters()
        checkpoint["hyper_parameters"] = plain(checkpoint.get("hyper_parameters") or {})
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["vae_dtype"] = dtype_name(self.vae.dtype)  # what model.vae_dtype: auto resolved to

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_adapter_keys(set(self.trainable_parameters()), set(checkpoint.get("state_dict", {})))
        then, now = checkpoint.get("vae_dtype"), dtype_name(self.vae.dtype)
        if then is not None and then != now:  # vae_dtype: auto on another kind of GPU (a T4 has no native bf16)
            rank_zero_warn(f"the checkpoint's run encoded its latents in {then}, this one in {now} (model.vae_dtype: "
                           f"{self.hparams.vae_dtype}): they differ by {then}/{now} rounding; resume with "
                           f"--model.vae_dtype {then} to keep the same latents.")
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise ValueError("model.ema.decay is set but the checkpoint holds no EMA weights (its run had EMA "
                                 "off): resume with model.ema.decay: null, or start a new run.")
            self.ema.load_state_dict(checkpoint["ema"])

    def export_lora(self, path: str, format: Literal["auto", "diffusers", "kohya"] = "auto") -> str:
        """Write the adapters as ``.safetensors``: diffusers layout (``auto`` for LoRA/DoRA; SDXL pipelines'
        ``load_lora_weights``) or kohya/LyCORIS (``auto`` for LoKr/LoHa; A1111, ComfyUI)."""
        hp, te = self.hparams, self.hparams.lora.train_text_encoder
        models = {"unet": self.unet, "text_encoder": self.text_encoder if te else None,
                  "text_encoder_2": self.text_encoder_2 if te else None}
        with self.averaged_weights() if hp.ema.export else nullcontext():
            return str(save_adapter(path, hp.lora.adapter, models, format))
