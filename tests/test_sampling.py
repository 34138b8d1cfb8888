"""Sampling on the tiny base: every scheduler runs, seeds fix images, LoRA files (both layouts) apply at their
scale, mismatching LoRA files and bad sizes/seeds/schedulers fail with clear messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth_pl.sdxl import BaseModelError
from dreambooth_pl.adapter.files import read_adapter, write_adapter
from dreambooth_pl.adapter.value import AdapterFormatError
from dreambooth_pl.sampling import (SCHEDULERS, SamplingError, add_loras, generate, load_pipeline, make_scheduler,
                                    pipeline_from_module)

PROMPT = "a photo of sks dog"


def px(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_base):
    return load_pipeline(tiny_base, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def lora_file(tiny_base, tmp_path_factory) -> str:
    """A non-zero rank-4 UNet LoRA for the tiny base, written by the training code's exporter."""
    from diffusers import UNet2DConditionModel

    from dreambooth_pl.adapter.files import save_adapter
    from dreambooth_pl.adapter.kinds import add_adapter, peft_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    add_adapter(unet, "lora", peft_config("lora", 4, init=False))
    for n, p in unet.named_parameters():  # peft's init=False B is small; make the effect visible in 2 steps
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    return str(save_adapter(tmp_path_factory.mktemp("lora") / "lora.safetensors", "lora", {"unet": unet}))


def test_every_listed_scheduler_runs(pipe, tiny_base):
    config = dict(pipe.scheduler.config)
    for name in SCHEDULERS:
        pipe.scheduler = make_scheduler(name, config)
        (img,) = generate(pipe, [PROMPT], [1], steps=2)
        assert img.size == (64, 64) and px(img).std() > 0, name
    pipe.scheduler = make_scheduler("euler", config)


def test_same_seed_same_image_and_batch_does_not_matter(pipe):
    a = generate(pipe, [PROMPT, "a dog on the beach"], [7, 8], steps=2, batch_size=2)
    b = generate(pipe, [PROMPT], [7], steps=2)
    c = generate(pipe, [PROMPT], [9], steps=2)
    again = generate(pipe, [PROMPT, "a dog on the beach"], [7, 8], steps=2, batch_size=2)
    assert all((px(x) == px(y)).all() for x, y in zip(a, again))
    assert np.abs(px(a[0]) - px(b[0])).max() <= 2  # batched matmuls may round differently, nothing more
    assert np.abs(px(b[0]) - px(c[0])).mean() > 5


def test_bad_inputs_name_the_value_and_the_fix(pipe):
    with pytest.raises(SamplingError, match="unknown scheduler 'k_lms'.*ddim, ddpm, pndm, euler, euler_a"):
        make_scheduler("k_lms", {})
    with pytest.raises(SamplingError, match="height must be a positive multiple of 8.*got 100; try 96"):
        generate(pipe, [PROMPT], [0], steps=1, height=100)
    with pytest.raises(SamplingError, match="2 prompt.*1 seed"):
        generate(pipe, [PROMPT, PROMPT], [0], steps=1)


def test_lora_for_another_base_names_the_first_mismatching_key(pipe, tmp_path):
    from safetensors.torch import save_file

    a = torch.zeros(4, 999)
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterFormatError, match="attn1.to_q.lora_A.weight.*different base"):
        add_loras(pipe, [(str(tmp_path / "other.safetensors"), 1.0)])
    with pytest.raises(SamplingError, match="does not exist"):
        add_loras(pipe, [(str(tmp_path / "missing.safetensors"), 1.0)])
    with pytest.raises(SamplingError, match="pytorch_lora_weights.safetensors' does not exist"):
        add_loras(pipe, [(str(tmp_path), 1.0)])  # a run folder without its exported file
    assert not getattr(pipe.unet, "peft_config", None)  # nothing was half-loaded


def test_lora_files_apply_at_their_scale_in_both_layouts(pipe, tiny_base, lora_file, tmp_path):
    kohya = write_adapter(read_adapter(lora_file), tmp_path / "kohya.safetensors", layout="kohya")
    (base_img,) = generate(pipe, [PROMPT], [3], steps=2)
    loaded = load_pipeline(tiny_base, [(lora_file, 1.0)], dtype="float32", device="cpu", vae_slicing=False,
                           vae_tiling=True)
    assert loaded.vae.use_tiling and not loaded.vae.use_slicing
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling  # the defaults
    (with_lora,) = generate(loaded, [PROMPT], [3], steps=2)
    assert np.abs(px(with_lora) - px(base_img)).mean() > 1
    loaded.set_adapters(["lora0"], adapter_weights=[0.0])
    (zero,) = generate(loaded, [PROMPT], [3], steps=2)
    assert np.abs(px(zero) - px(base_img)).max() <= 2
    add_loras(pipe, [(str(kohya), 1.0)])  # last user of the shared pipeline
    (from_kohya,) = generate(pipe, [PROMPT], [3], steps=2)
    assert np.abs(px(from_kohya) - px(with_lora)).max() <= 2


def test_pipeline_from_module_shares_live_models_and_decodes_beside_a_bf16_unet(tiny_base):
    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import LoraSettings

    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False))
    module.configure_model()
    module.unet.to(torch.bfloat16)  # a half-precision UNet beside the fp32 VAE, as under bf16/16-mixed training
    module.text_encoder.to(torch.bfloat16)
    module.text_encoder_2.to(torch.bfloat16)
    p = pipeline_from_module(module, "dpmpp_2m")
    assert p.unet is module.unet and p.vae is module.vae and p.vae.dtype == torch.float32
    (img,) = generate(p, [PROMPT], [0], steps=2)
    assert img.size == (64, 64) and px(img).std() > 0


def test_a_separate_vae_folder_replaces_the_base_vae(tiny_base, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    vae.register_to_config(force_upcast=False)  # what the fp16-fix VAE declares: it decodes safely in fp16
    vae.save_pretrained(tmp_path / "vae-fix")
    p = load_pipeline(tiny_base, vae=str(tmp_path / "vae-fix"), dtype="float32", device="cpu")
    assert p.vae.config.force_upcast is False
    (img,) = generate(p, [PROMPT], [0], steps=1)
    assert img.size == (64, 64)
    with pytest.raises(BaseModelError, match="neither config.json nor vae/config.json"):
        load_pipeline(tiny_base, vae=str(tmp_path), dtype="float32", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_sampling_on_gpu_decodes_in_fp32_without_nans(tiny_base):
    p = load_pipeline(tiny_base, dtype="float16", device="cuda")
    assert p.unet.dtype == torch.float16 and p.vae.dtype == torch.float32
    (img,) = generate(p, [PROMPT], [0], steps=4)
    assert px(img).std() > 0  # a NaN decode comes back as a flat black image


def test_the_light_scheduler_names_are_the_schedulers_keys():
    """sampler_settings.py checks names without importing diffusers; the two lists must not drift apart."""
    from dreambooth_pl.sampler_settings import SCHEDULER_NAMES

    assert SCHEDULER_NAMES == tuple(SCHEDULERS)


def test_the_zeroed_negatives_cross_attention_is_filled_in_and_the_images_stay_the_pipelines(pipe):
    """Without a negative prompt ``generate`` computes each cross-attention on the positive rows only
    (zero_negative.py) and draws the pipeline's own images within float rounding; a negative prompt computes every
    row; the pipeline keeps its processors after."""
    from dreambooth_pl.sampling import decode_latents

    rows, hooks = [], [m.to_q.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
                       for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    try:
        ours = generate(pipe, [PROMPT, "a dog on the beach"], [7, 8], steps=2, batch_size=2)
        assert rows and set(rows) == {2}
        rows.clear()
        generate(pipe, [PROMPT], [7], steps=2, negative_prompt="blurry")
        assert set(rows) == {2}  # one image, its negative and positive rows
    finally:
        for h in hooks:
            h.remove()
    assert {type(m.processor).__name__ for n, m in pipe.unet.named_modules() if n.endswith("attn2")} == \
        {"AttnProcessor2_0"}
    gens = [torch.Generator("cpu").manual_seed(s) for s in (7, 8)]
    latents = pipe(prompt=[PROMPT, "a dog on the beach"], num_inference_steps=2, generator=gens,
                   output_type="latent").images
    assert all(np.abs(px(a) - px(b)).max() <= 1 for a, b in zip(ours, decode_latents(pipe, latents)))
