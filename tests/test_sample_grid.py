"""SampleGrid: base and LoRA grids differ, weights/flags/RNG are untouched, and a fit logs images to TensorBoard."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth_pl.callbacks.sample_grid import SampleGrid
from dreambooth_pl.sampling import SamplerSettings


def test_draw_switches_adapters_off_and_back_without_touching_weights(tiny_base):
    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import LoraSettings

    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False))
    module.configure_model()
    module.unet.train()
    module.unet.conv_in.eval()  # a mixed tree: each submodule's own mode must come back
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = {n: p.requires_grad for n, p in module.named_parameters()}
    rng = torch.get_rng_state()
    grid = SampleGrid(["a photo of sks dog", "a dog"], sampler=SamplerSettings(steps=2), resolution=32)
    lora = grid.draw(None, module, adapters=True)
    base = grid.draw(None, module, adapters=False)
    again = grid.draw(None, module, adapters=True)
    assert len(lora) == 2 and lora[0].size == (32, 32)
    assert np.abs(np.asarray(lora[0], dtype=int) - np.asarray(base[0])).mean() > 1  # adapters really were off
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(lora, again))  # ...and really back on
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {n: p.requires_grad for n, p in module.named_parameters()}
    assert module.unet.training and not module.unet.conv_in.training and not module.vae.training
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="sampler.scheduler 'fast' is unknown"):
        SampleGrid(sampler=SamplerSettings("fast"))
    with pytest.raises(ValueError, match="multiple of 8"):
        SampleGrid(resolution=30)


def test_fit_logs_base_and_lora_grids_to_tensorboard(tiny_base, subject_dirs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    instance_dir, _ = subject_dirs
    class_dir = tmp_path / "generated-class"  # empty: data.priors.generate fills it with the linked base
    args = fit_args(tiny_base, instance_dir, str(class_dir), str(tmp_path), steps=2, **{
        "data.priors.num_images": 2, "data.priors.generate": "true", "data.priors.generation.sampler.steps": 1})
    args += ["--trainer.callbacks+", "dreambooth_pl.callbacks.sample_grid.SampleGrid",
             "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.sampler.steps", "2"]
    cli = DreamBoothCLI(args=args)
    assert len(list(class_dir.glob("class_*.png"))) == 2
    log_dir = cli.trainer.log_dir
    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"samples/base", "samples/lora"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/lora")] == [1, 2]
    assert len(events.Images("samples/base")) == 1
    pngs = sorted(p.name for p in (tmp_path / "lightning_logs").glob("*/samples/*.png"))
    assert pngs == ["samples_base_step000000.png", "samples_lora_step000001.png", "samples_lora_step000002.png"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grids_under_16_mixed_on_gpu(tiny_base, subject_dirs, tmp_path):
    """fp16 UNet and text encoders, fp32 VAE and adapters: the grid still decodes (no NaN, not flat)."""
    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    instance_dir, class_dir = subject_dirs
    args = fit_args(tiny_base, instance_dir, class_dir, str(tmp_path), steps=1, **{
        "trainer.accelerator": "gpu", "trainer.precision": "16-mixed"})
    args += ["--trainer.callbacks+", "dreambooth_pl.callbacks.sample_grid.SampleGrid",
             "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.sampler.steps", "4"]
    cli = DreamBoothCLI(args=args)
    grid = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SampleGrid))
    assert cli.model.unet.dtype == torch.float16
    (img,) = grid.draw(cli.trainer, cli.model, adapters=True)
    assert np.asarray(img).std() > 0


@pytest.mark.parametrize("cache,text_encoder", [("off", False), ("all", False), ("latents", True)])
def test_callbacks_sample_from_half_weights_and_fp32_adapters(tiny_base, subject_dirs, tmp_path, cache, text_encoder):
    """bf16-mixed on the CPU gives the GPU's 16-mixed layout (half frozen base, fp32 adapters): SampleGrid and
    SubjectMetrics draw and score from it, with input caching and text-encoder LoRA, leaving training untouched."""
    from conftest import fit_args
    from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics
    from dreambooth_pl.cli import DreamBoothCLI

    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=2, **{
        "trainer.precision": "bf16-mixed", "model.perf.cache": cache,
        "model.lora.train_text_encoder": str(text_encoder)})
    args += ["--trainer.callbacks+", "dreambooth_pl.callbacks.sample_grid.SampleGrid",
             "--trainer.callbacks.every_n_steps", "1", "--trainer.callbacks.sampler.steps", "2",
             "--trainer.callbacks+=dreambooth_pl.callbacks.subject_metrics.SubjectMetrics",
             "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.clip_weights=null",
             "--trainer.callbacks.dino_weights=null"]
    cli = DreamBoothCLI(args=args)
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 2 and module.unet.dtype == torch.bfloat16
    assert {p.dtype for p in module.trainable_parameters().values()} == {torch.float32}
    metrics = next(cb for cb in trainer.callbacks if isinstance(cb, SubjectMetrics))
    assert set(metrics.last_scores) == {"val/clip_i", "val/clip_t", "val/dino"}
    assert all(np.isfinite(v) for v in metrics.last_scores.values())
    grid = next(cb for cb in trainer.callbacks if isinstance(cb, SampleGrid))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    module.unet.train()
    images = grid.draw(None, module, adapters=True)  # no cache key: a fresh draw through the same path
    assert np.asarray(images[0]).std() > 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and module.unet.training
