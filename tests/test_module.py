"""DreamBoothLoRA: the loss wiring against diffusers' own pieces, what trains, checkpoint contents, early validation."""
import warnings

import pytest
import torch

from dreambooth_pl.data.datasets import ImageSet, PairedStream
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.settings import LoraSettings, PerfSettings
from conftest import write_images


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("module")
    inst = ImageSet(tuple(write_images(root / "i", 2, size=(48, 40), seed=1)), "a photo of sks dog")
    cls = ImageSet(tuple(write_images(root / "c", 2, size=(40, 56), seed=2)), "a photo of dog")
    return PairedStream(inst, cls, 32, batch_size=2, seed=0).batch(0)


def _module(base: str, **kw) -> DreamBoothLoRA:
    m = DreamBoothLoRA(base_model=base, lora=LoraSettings(init=False), **kw)
    m.configure_model()
    return m


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def module(request, tiny_base, tmp_path_factory) -> DreamBoothLoRA:
    """The tiny base, and a copy whose scheduler config says v-prediction (the module must follow it)."""
    import json
    import shutil
    from pathlib import Path

    base = Path(tiny_base)
    if request.param != "epsilon":
        base = tmp_path_factory.mktemp("vbase") / "base"
        base.mkdir()
        for part in Path(tiny_base).iterdir():
            (base / part.name).symlink_to(part)
        (base / "scheduler").unlink()
        shutil.copytree(Path(tiny_base) / "scheduler", base / "scheduler")
        cfg_file = base / "scheduler" / "scheduler_config.json"
        cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), prediction_type=request.param)))
    m = _module(str(base), prior_loss_weight=0.7, seed=5)
    assert m.noise.prediction_type == request.param
    return m


def test_loss_equals_a_hand_computation_with_diffusers_parts(module, batch):
    """Recompute DreamBooth eq. 2 the way diffusers' train_dreambooth_lora_sdxl.py does, from the same draws."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    m = module
    with torch.no_grad():
        got = m.forward_loss(batch)
        # the module's documented draws, replayed: one generator per example, seeded by (seed, example id)
        from dreambooth_pl.noise import mix_seed

        dist = m.vae.encode(batch["pixel_values"]).latent_dist
        eps, noise, t = [], [], []
        for i in batch["example_id"]:
            gen = torch.Generator().manual_seed(mix_seed(5, i))
            eps.append(torch.randn(dist.mean.shape[1:], generator=gen))
            noise.append(torch.randn(dist.mean.shape[1:], generator=gen))
            t.append(torch.randint(0, 1000, (1,), generator=gen))
        latents = (dist.mean + dist.std * torch.stack(eps)) * m.vae.config.scaling_factor
        noise, t = torch.stack(noise), torch.cat(t)
        noisy = DDPMScheduler.from_config(m.scheduler_config).add_noise(latents, noise, t)
        pipe = StableDiffusionXLPipeline(m.vae, m.text_encoder, m.text_encoder_2, *m.tokenizers, m.unet,
                                         EulerDiscreteScheduler.from_config(m.scheduler_config))
        emb, _, pooled, _ = pipe.encode_prompt(batch["prompt"], device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.cat([pipe._get_add_time_ids(tuple(o.tolist()), tuple(c.tolist()), (32, 32), torch.float32,
                                                     m.text_encoder_2.config.projection_dim)
                              for o, c in zip(batch["original_size"], batch["crop_top_left"])])
        pred = m.unet(noisy, t, encoder_hidden_states=emb,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    sched = DDPMScheduler.from_config(m.scheduler_config)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred_inst, pred_prior = pred.chunk(2)
    target_inst, target_prior = target.chunk(2)
    instance, prior = F.mse_loss(pred_inst, target_inst), F.mse_loss(pred_prior, target_prior)
    torch.testing.assert_close(got["loss_instance"], instance)
    torch.testing.assert_close(got["loss_prior"], prior)
    torch.testing.assert_close(got["loss"], instance + 0.7 * prior)


def test_only_lora_trains_and_base_weights_stay_bit_identical(tiny_base, batch):
    m = _module(tiny_base)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainable = m.trainable_parameters()
    assert trainable and all("lora_" in n and n.startswith("unet.") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        m.forward_loss(batch)["loss"].backward()
        opt.step()
    after = m.state_dict()
    frozen = [k for k in before if "lora_" not in k]
    assert any(k.startswith(p) for k in frozen for p in ("vae.", "text_encoder.", "text_encoder_2.", "unet."))
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    changed = [k for k in trainable if not torch.equal(before[k], after[k])]
    assert len(changed) == len(trainable)


def test_checkpoints_keep_only_the_adapters_and_refuse_other_models(module):
    m = module
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == set(m.trainable_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own checkpoint loads, silently
        m.on_load_checkpoint(ckpt)
    assert ckpt["vae_dtype"] == "float32"  # what model.vae_dtype resolved to on this device
    # model.vae_dtype: auto resolved otherwise on another GPU (bf16 there, fp32 on a T4): named, with the fix
    with pytest.warns(UserWarning, match=r"encoded its latents in bfloat16, this one in float32 .*"
                                         r"--model.vae_dtype bfloat16"):
        m.on_load_checkpoint(dict(ckpt, vae_dtype="bfloat16"))
    key = next(iter(ckpt["state_dict"]))
    del ckpt["state_dict"][key]
    with pytest.raises(ValueError, match=f"missing key '{key}'.*config the checkpoint was trained with"):
        m.on_load_checkpoint(ckpt)


@pytest.mark.parametrize("kwargs, message", [
    ({"prior_loss_weight": -1.0}, "prior_loss_weight must be >= 0"),
    ({"snr_gamma": 0.0}, "model.snr_gamma must be > 0"),
    ({"noise_offset": -0.1}, "model.noise_offset must be >= 0"),
    ({"perf": PerfSettings(cuda_graph=True), "lora": LoraSettings(dropout=0.1)}, "model.lora.dropout breaks"),
])
def test_bad_hyperparameters_fail_before_any_model_loads(monkeypatch, kwargs, message):
    """Top-level values and combinations of groups (each group checks its own values: test_settings.py)."""
    def no_load(*a, **k):
        raise AssertionError("the base was loaded before the hyperparameters were checked")

    monkeypatch.setattr("dreambooth_pl.model_setup.load_parts", no_load)
    with pytest.raises(ValueError, match=message):
        DreamBoothLoRA(base_model="unused", **kwargs)


def test_a_loss_mask_of_ones_changes_nothing_and_a_uniform_half_halves_the_loss(module, batch):
    n = len(batch["prompt"])
    with torch.no_grad():
        plain = module.forward_loss(batch)
        ones = module.forward_loss({**batch, "loss_mask": torch.ones(n, 1, 32, 32)})
        half = module.forward_loss({**batch, "loss_mask": torch.full((n, 1, 32, 32), 0.5)})
    assert torch.equal(plain["loss"], ones["loss"])
    torch.testing.assert_close(half["loss_instance"], 0.5 * plain["loss_instance"])


def test_optimizer_groups_use_the_reference_text_encoder_lr_and_decay(tiny_base):
    """train_dreambooth_lora_sdxl.py: --text_encoder_lr 5e-6, --adam_weight_decay_text_encoder 1e-3; the UNet
    keeps --learning_rate 1e-4 and --adam_weight_decay 1e-4; its LoRA init is gaussian."""
    import lightning as L

    m = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(train_text_encoder=True))
    assert m.hparams.lora.init == "gaussian"
    m.configure_model()
    m.trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False)
    unet, te = m.configure_optimizers()["optimizer"].param_groups
    assert (unet["lr"], unet["weight_decay"]) == (1e-4, 1e-4)
    assert (te["lr"], te["weight_decay"]) == (5e-6, 1e-3)
    assert len(te["params"]) == sum(p.requires_grad for t in (m.text_encoder, m.text_encoder_2)
                                    for p in t.parameters()) > 0


def test_encode_and_cached_paths_normalise_by_the_vaes_latents_mean_and_std(tiny_base, batch):
    """A VAE whose config has latents_mean/std: both training paths apply them, as the reference does."""
    from dreambooth_pl.sdxl import scale_latents

    m = _module(tiny_base)
    mean, std = [0.5, -0.5, 0.25, 0.0], [2.0, 0.5, 1.0, 4.0]
    m.vae.register_to_config(latents_mean=mean, latents_std=std)
    try:
        dist = m.vae.encode(batch["pixel_values"]).latent_dist
        cached = {k: v for k, v in batch.items() if k != "pixel_values"}
        with torch.no_grad():  # the encode path samples the VAE's distribution as the cached path samples its copy
            torch.testing.assert_close(m.forward_loss(batch)["loss"], m.forward_loss(
                dict(cached, latent_mean=dist.mean, latent_std=dist.std))["loss"])
        cached.update(latent_mean=dist.mean, latent_std=torch.zeros_like(dist.std))  # std 0: latents = mean
        plain = dict(cached, latent_mean=scale_latents(dist.mean, m.vae.config))
        with torch.no_grad():
            got = m.forward_loss(cached)["loss"]
        m.vae.register_to_config(latents_mean=None, latents_std=None)
        with torch.no_grad():  # unnormalised path fed the normalised latents: the same loss
            same = m.forward_loss(dict(plain, latent_mean=plain["latent_mean"] / m.vae.config.scaling_factor))
        torch.testing.assert_close(got, same["loss"])
    finally:
        m.vae.register_to_config(latents_mean=None, latents_std=None)
