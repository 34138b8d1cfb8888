"""Adapter kinds through peft: config, which parameters train, and the diffusers-layout file SDXL pipelines load."""
import re

import pytest
import torch

from dreambooth_pl.adapter import kinds
from dreambooth_pl.adapter.files import LORA_FILE, save_adapter
from dreambooth_pl.adapter.value import COMPONENTS


@pytest.fixture(scope="module")
def pipe(tiny_base):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_base)


def _adapted(pipe, text: bool = False, seed: int = 0):
    """Fresh copies of the pipeline's UNet (and text encoders) with non-zero adapters (B != 0)."""
    import copy

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    kinds.add_adapter(unet, "lora", kinds.peft_config("lora", 4, init=False))
    tes = (None, None)
    if text:
        tes = tuple(copy.deepcopy(m) for m in (pipe.text_encoder, pipe.text_encoder_2))
        for m in tes:
            kinds.add_adapter(m, "lora", kinds.peft_config("lora", 2, 4.0, target_modules=kinds.TEXT_TARGETS, init=False))
    return unet, *tes


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match=f"model.lora.rank must be > 0, got {rank}"):
        kinds.peft_config("lora", rank)


def test_alpha_defaults_to_rank():
    cfg = kinds.peft_config("lora", 8)
    assert (cfg.r, cfg.lora_alpha) == (8, 8) and set(cfg.target_modules) == set(kinds.UNET_TARGETS)


def test_only_adapters_train_and_they_are_fp32(pipe):
    import copy

    unet = copy.deepcopy(pipe.unet).half().requires_grad_(False)
    params = kinds.add_adapter(unet, "lora", kinds.peft_config("lora", 4))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(params)
    assert {p.dtype for p in params} == {torch.float32}
    assert all(re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.default\.weight$", n) for n in trainable)
    attn = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn1.to_q"))
    assert len(params) == 2 * 4 * 2 * attn  # A and B for q, k, v, out of self- and cross-attention


def test_unknown_target_module_is_named(pipe):
    import copy

    with pytest.raises(ValueError, match="no_such_proj"):
        kinds.add_adapter(copy.deepcopy(pipe.unet), "lora", kinds.peft_config("lora", 2, target_modules=["no_such_proj"]))


def _roundtrip(pipe, tmp_path, text: bool):
    from peft.utils import get_peft_model_state_dict

    models = _adapted(pipe, text=text)
    path = save_adapter(tmp_path / "out", "lora", dict(zip(COMPONENTS, models)))
    assert path.name == LORA_FILE
    pipe.load_lora_weights(str(path), adapter_name="t")
    try:
        for ours, loaded in zip(models, (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
            if ours is None:
                assert not getattr(loaded, "peft_config", None)
                continue
            want, got = get_peft_model_state_dict(ours), get_peft_model_state_dict(loaded, adapter_name="t")
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
            assert loaded.peft_config["t"].r == ours.peft_config["default"].r
            assert loaded.peft_config["t"].lora_alpha == ours.peft_config["default"].lora_alpha
    finally:
        pipe.delete_adapters("t")


def test_unet_export_loads_into_the_sdxl_pipeline_unchanged(pipe, tmp_path):
    _roundtrip(pipe, tmp_path, text=False)


def test_text_encoder_export_loads_into_the_sdxl_pipeline_unchanged(pipe, tmp_path):
    _roundtrip(pipe, tmp_path, text=True)


def test_export_is_atomic_and_refuses_models_without_adapters(pipe, tmp_path):
    unet, _, _ = _adapted(pipe)
    path = save_adapter(tmp_path / "a.safetensors", "lora", {"unet": unet})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="carries an adapter named 'default'"):
        save_adapter(path, "lora", {"unet": pipe.unet})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left behind


def test_default_init_is_the_reference_gaussian_and_peft_inits_stay_available(pipe):
    """diffusers' train_dreambooth_lora_sdxl.py: ``init_lora_weights="gaussian"``, A ~ N(0, std 1/r), B = 0."""
    import copy

    stds = {}
    for init in ("gaussian", True, False):
        torch.manual_seed(0)
        unet = copy.deepcopy(pipe.unet)
        kinds.add_adapter(unet, "lora", kinds.peft_config("lora", 4, init=init))
        a = torch.cat([p.flatten() for n, p in unet.named_parameters() if "lora_A" in n])
        b = torch.cat([p.flatten() for n, p in unet.named_parameters() if "lora_B" in n])
        stds[init] = a.std().item()
        assert (b.abs().max().item() == 0) is (init is not False)
    assert kinds.peft_config("lora", 4).init_lora_weights == "gaussian"
    assert stds["gaussian"] == pytest.approx(1 / 4, rel=0.03)
    assert stds[True] < stds["gaussian"] / 2  # peft's Kaiming uniform: the smaller init the issue measured
