"""Base resolution (local folder / hub id, offline failures), part loading, prompt encoding, add_time_ids."""
import time
from pathlib import Path

import pytest
import torch

from dreambooth_pl.sdxl import BaseModelError, add_time_ids, encode_prompts, load_parts, resolve_base, tokenize


FAKE_ID = "dreambooth-pl-tests/no-such-sdxl"


def test_local_folder_resolves_to_itself(tiny_base):
    assert resolve_base(tiny_base) == tiny_base


def test_folder_that_is_not_a_pipeline_says_how_to_fix(tmp_path):
    with pytest.raises(BaseModelError, match="no model_index.json or unet/.*make-base"):
        resolve_base(str(tmp_path))
    with pytest.raises(BaseModelError, match="neither an existing folder nor a hub id"):
        resolve_base(str(tmp_path / "missing" / "base"))


def _fails_fast(call, *args) -> str:
    start = time.monotonic()
    with pytest.raises(BaseModelError) as err:
        call(*args)
    assert time.monotonic() - start < 10
    return str(err.value)


def test_offline_hub_id_fails_in_seconds_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _fails_fast(load_parts, FAKE_ID)
    assert FAKE_ID in msg and "unreachable" in msg and "model.base_model" in msg and "make-base" in msg


def test_unreachable_hub_fails_in_seconds_without_retries(monkeypatch):
    import huggingface_hub.constants as hfc

    # online mode against an endpoint that refuses connections: the path a machine without network takes
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hfc, "ENDPOINT", "http://127.0.0.1:9")
    msg = _fails_fast(resolve_base, FAKE_ID)
    assert FAKE_ID in msg and "unreachable" in msg and "ConnectError" in msg and "--local-dir" in msg


def test_broken_base_folder_names_it(tmp_path, tiny_base):
    broken = tmp_path / "base"
    broken.mkdir()
    (broken / "model_index.json").write_text((Path(tiny_base) / "model_index.json").read_text())
    with pytest.raises(BaseModelError, match=f"could not load the SDXL parts from '{broken}'"):
        load_parts(str(broken))


@pytest.fixture(scope="module")
def parts(tiny_base):
    return load_parts(tiny_base)


def test_parts_are_frozen_fp32_in_eval_mode(parts):
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert parts.scheduler_config["prediction_type"] == "epsilon"
    assert parts.scheduler_config["num_train_timesteps"] == 1000


def test_prompt_encoding_matches_the_diffusers_pipeline(parts, tiny_base):
    from diffusers import StableDiffusionXLPipeline

    prompts = ["a photo of sks dog", "a photo of dog on the beach"]
    emb, pooled = encode_prompts((parts.text_encoder, parts.text_encoder_2),
                                 [tokenize(parts.tokenizer, prompts), tokenize(parts.tokenizer_2, prompts)])
    pipe = StableDiffusionXLPipeline.from_pretrained(  # the same modules; only the scheduler is loaded
        tiny_base, vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet)
    ref_emb, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(emb, ref_emb)
    torch.testing.assert_close(pooled, ref_pooled)
    assert emb.shape == (2, 77, parts.unet.config.cross_attention_dim)


def test_add_time_ids_order_is_original_crop_target():
    ids = add_time_ids(torch.tensor([[768, 1024]]), torch.tensor([[10, 20]]), torch.tensor([[1024, 1024]]))
    assert ids.tolist() == [[768.0, 1024.0, 10.0, 20.0, 1024.0, 1024.0]] and ids.dtype == torch.float32


@pytest.mark.parametrize("moments", [False, True])
def test_latent_scaling_is_the_reference_formula_and_its_inverse(moments):
    """train_dreambooth_lora_sdxl.py encodes ``(z - mean) * sf / std``; StableDiffusionXLPipeline decodes
    ``z * std / sf + mean``; without latents_mean/std both reduce to the scaling factor alone."""
    from types import SimpleNamespace

    from dreambooth_pl.sdxl import scale_latents, unscale_latents

    mean, std = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.8, 1.3]
    cfg = SimpleNamespace(scaling_factor=0.13025, latents_mean=mean if moments else None,
                          latents_std=std if moments else None)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    want = (z - m) * 0.13025 / s if moments else z * 0.13025
    torch.testing.assert_close(scale_latents(z, cfg), want)
    torch.testing.assert_close(unscale_latents(scale_latents(z, cfg), cfg), z)
    assert not torch.allclose(scale_latents(z, cfg), z * 0.13025) if moments else True


def test_the_auto_vae_dtype_is_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """``model.vae_dtype: auto`` (the recipes): bf16 on a GPU with native bf16, fp32 on a T4 (which only emulates
    it: ``including_emulation=False``) and on the CPU; named dtypes are taken as given."""
    import torch

    from dreambooth_pl.sdxl import vae_dtype_on

    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    native = True
    assert vae_dtype_on("auto", torch.device("cuda")) == torch.bfloat16 and asked == [False]
    native = False  # a T4
    assert vae_dtype_on("auto", torch.device("cuda")) == torch.float32
    assert vae_dtype_on("auto", torch.device("cpu")) == vae_dtype_on("auto", None) == torch.float32
    assert vae_dtype_on("float32", torch.device("cuda")) == torch.float32
    assert vae_dtype_on("bfloat16", torch.device("cpu")) == torch.bfloat16
