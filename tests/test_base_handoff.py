"""The prior sampler leaves its loaded base for training's load (base_handoff.py): one read of the base per fit."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from dreambooth_pl import base_handoff
from dreambooth_pl.prior_sampler import PriorSampler
from dreambooth_pl.sdxl import load_parts


@pytest.fixture(autouse=True)
def nothing_left():
    base_handoff.release()
    yield
    base_handoff.release()


def _drawn(tiny_base, **switches) -> PriorSampler:
    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2, **switches)
    s.latents("a photo of dog", [0, 1], steps=2, height=64, width=64)
    return s


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_takes_the_samplers_parts_restored_as_a_plain_load(tiny_base):
    s = _drawn(tiny_base, fused_geglu=True)
    unet = s.pipe.unet
    assert any("forward" in vars(m) for m in unet.modules())  # the sampler's GEGLU patch
    assert s.leave_base() and s.pipe is None
    assert {k[2] for k in base_handoff.waiting()} == {"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                                      "vae", "unet"}
    taken = load_parts(tiny_base, None, torch.float32, "cpu", torch.float32)
    assert taken.unet is unet and not base_handoff.waiting()  # taken once
    assert not any("forward" in vars(m) for m in unet.modules())  # diffusers' own forwards again
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}, processors  # the sampler's plain attention and constant: gone
    fresh = load_parts(tiny_base, None, torch.float32, "cpu", torch.float32)
    assert fresh.unet is not unet
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the same file into the same dtype: bit equal
        assert _same_weights(getattr(taken, name), getattr(fresh, name)), name
    assert not any(p.requires_grad for p in taken.unet.parameters()) and not taken.unet.training


def test_parts_of_another_dtype_are_released_before_the_load(tiny_base, monkeypatch):
    from diffusers import AutoencoderKL

    s = _drawn(tiny_base)
    vae = weakref.ref(s.pipe.vae)
    assert s.leave_base()
    del s
    alive_at_read = []
    plain = AutoencoderKL.from_pretrained.__func__

    def read(cls, *args, **kwargs):
        gc.collect()
        alive_at_read.append(vae() is not None)
        return plain(cls, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(read))
    # the VAE asked in bf16 (the sampler's is fp32): read again, and the left one is gone before that read
    parts = load_parts(tiny_base, None, torch.float32, "cpu", torch.bfloat16)
    assert alive_at_read == [False] and parts.vae.dtype == torch.bfloat16 and not base_handoff.waiting()


@pytest.mark.parametrize("switch", [{"fuse_qkv": True}, {"vae_tiling": True}])
def test_parts_that_differ_from_a_plain_load_are_not_left(tiny_base, switch):
    s = _drawn(tiny_base, **switch)
    left = s.leave_base()
    names = {k[2] for k in base_handoff.waiting()}
    if "fuse_qkv" in switch:  # its attention lost the separate projections
        assert not left and not names
    else:  # a tiling VAE stays out alone
        assert left and "vae" not in names and "unet" in names


def test_a_fit_that_draws_its_priors_reads_the_unet_once(tiny_base, subject_dirs, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    reads = []
    plain = UNet2DConditionModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        reads.append(kwargs.get("subfolder"))
        return plain(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(counted))
    priors = tmp_path / "priors"
    args = fit_args(tiny_base, subject_dirs[0], str(priors), str(tmp_path), steps=2, **{
        "data.priors.generate": "true", "data.priors.num_images": 2,
        "data.priors.generation": json.dumps({"sampler": {"steps": 1}, "batch_size": 2, "cache": False})})
    cli = DreamBoothCLI(args=args)
    assert reads == ["unet"]  # the sampler's; training took it
    assert json.loads((priors / "manifest.json").read_text())["timing"]["left_base"] == 1
    assert cli.trainer.global_step == 2 and not base_handoff.waiting()
    lora = [p for n, p in cli.model.unet.named_parameters() if "lora_" in n]
    assert lora and all(torch.isfinite(p).all() for p in lora)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_draws_parts_are_what_training_would_load(tiny_base):
    """On a GPU the sampler draws in fp16 with its one-kernel GEGLU and decodes in bf16 where the card has it; the
    16-mixed fit's load (fp16 UNet and encoders, ``vae_dtype: auto``) takes every part, and the UNet, its GEGLU
    restored, gives a fresh load's output."""
    from dreambooth_pl.sdxl import vae_dtype_on

    s = PriorSampler(tiny_base, "euler", None, "cuda", batch_size=2)
    s.latents("a photo of dog", [0, 1], steps=2, height=64, width=64)
    assert s.leave_base()
    vae_dtype = vae_dtype_on("auto", torch.device("cuda"))
    taken = load_parts(tiny_base, None, torch.float16, torch.device("cuda"), vae_dtype)
    assert not base_handoff.waiting() and taken.vae.dtype == vae_dtype
    fresh = load_parts(tiny_base, None, torch.float16, torch.device("cuda"), vae_dtype)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same_weights(getattr(taken, name), getattr(fresh, name)), name
    g = torch.Generator("cuda").manual_seed(0)
    c = taken.unet.config
    x = torch.randn(2, c.in_channels, 8, 8, device="cuda", dtype=torch.float16, generator=g)
    text = torch.randn(2, 77, c.cross_attention_dim, device="cuda", dtype=torch.float16, generator=g)
    pooled = torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, device="cuda",
                         dtype=torch.float16, generator=g)
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, device="cuda",
                                                             dtype=torch.float16)}
    with torch.no_grad():
        a = taken.unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=cond).sample
        b = fresh.unet(x, 10, encoder_hidden_states=text, added_cond_kwargs=cond).sample
    # the same weights through diffusers' own forward; fp16 tolerance, as cuDNN may pick another algorithm per call
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
