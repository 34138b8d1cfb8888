"""LoRA layouts: our files load in diffusers with identical outputs; kohya round trips are exact; bad keys named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth_pl.adapter.base import check_base
from dreambooth_pl.adapter.files import detect_layout, read_adapter, write_adapter
from dreambooth_pl.adapter.kinds import TEXT_TARGETS, UNET_TARGETS
from dreambooth_pl.adapter.kohya_layout import to_kohya
from dreambooth_pl.adapter.value import AdapterFormatError, from_models, uniform_alpha


def random_lora(model: torch.nn.Module, seed: int, rank: int = 4, alpha: float = 2.0, targets=UNET_TARGETS,
                adapter: str = "default", **patterns) -> torch.nn.Module:
    """Inject a seeded LoRA with non-zero A and B (peft ``init_lora_weights=False``) into ``model``, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **patterns)
    inject_adapter_in_model(cfg, model, adapter_name=adapter)
    return model


def load_unet(base: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()


def unet_inputs(unet, seed: int = 0) -> dict:
    """Fixed seeded inputs of a tiny SDXL UNet (latents, timestep, text states, pooled + time ids)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)})


@torch.no_grad()
def unet_out(unet, seed: int = 0) -> torch.Tensor:
    return unet(**unet_inputs(unet, seed)).sample


@pytest.fixture(scope="module")
def pipe(tiny_base):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_base)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_written_file_loads_in_diffusers_with_equal_unet_output(pipe, tiny_base, tmp_path, fmt):
    ours = random_lora(load_unet(tiny_base), seed=1, rank=4, alpha=2.0, rank_pattern={"to_k": 2},
                       alpha_pattern={"to_v": 8.0})
    expected = unet_out(ours)
    lora = from_models({"unet": ours})
    if fmt == "kohya":  # diffusers reads kohya alphas right only when they are uniform (see uniform_alpha)
        lora = uniform_alpha(lora)
    path = write_adapter(lora, tmp_path / f"{fmt}.safetensors", fmt)
    assert detect_layout(load_file(path)) == fmt
    pipe.load_lora_weights(str(path), adapter_name=fmt)  # diffusers' own loader, kohya conversion included
    try:
        got = unet_out(pipe.unet)
    finally:
        pipe.delete_adapters(fmt)
    base_out = unet_out(pipe.unet)
    assert (expected - base_out).abs().max() > 1e-2  # the adapter changes the output, so equality means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_text_encoder_parts_load_in_diffusers(pipe, tmp_path, fmt):
    import copy

    te1, te2 = copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.text_encoder_2)
    random_lora(te1, seed=2, rank=2, alpha=4.0, targets=TEXT_TARGETS)
    random_lora(te2, seed=3, rank=3, alpha=3.0, targets=TEXT_TARGETS + ("fc1",))
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (te1(ids).last_hidden_state, te2(ids).text_embeds)
    path = write_adapter(from_models({"text_encoder": te1, "text_encoder_2": te2}), tmp_path / "te.safetensors", fmt)
    keys = list(load_file(path))
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in keys) or fmt == "diffusers"
    pipe.load_lora_weights(str(path), adapter_name=f"te_{fmt}")
    try:
        with torch.no_grad():
            got = (pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder_2(ids).text_embeds)
    finally:
        pipe.delete_adapters(f"te_{fmt}")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)


def test_kohya_to_ours_to_kohya_is_key_and_value_identical(pipe, tmp_path):
    import copy

    unet = random_lora(copy.deepcopy(pipe.unet), seed=4, rank=3, alpha=1.5)
    te2 = random_lora(copy.deepcopy(pipe.text_encoder_2), seed=5, rank=2, alpha=1.0, targets=TEXT_TARGETS)
    original = {k: v.to(torch.float16) for k, v in to_kohya(from_models({"unet": unet, "text_encoder_2": te2})).items()}
    src = tmp_path / "kohya.safetensors"
    save_file(original, src)  # fp16 alphas, as sd-scripts saves them
    ours = read_adapter(src)
    write_adapter(ours, tmp_path / "diffusers.safetensors", "diffusers")
    again = write_adapter(read_adapter(tmp_path / "diffusers.safetensors"), tmp_path / "again.safetensors", "kohya")
    back = load_file(again)
    assert set(back) == set(original)
    for k in original:
        assert back[k].dtype == original[k].dtype or k.endswith(".alpha"), k
        assert torch.equal(back[k].to(original[k].dtype), original[k]), k
    direct = load_file(write_adapter(ours, tmp_path / "direct.safetensors", "kohya"))
    assert all(torch.equal(direct[k], original[k]) and direct[k].dtype == original[k].dtype for k in original)


def test_wrong_keys_are_named(tmp_path, pipe):
    good = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2)}
    cases = {
        "lora_unet_mid_block_attentions_0_proj_out.lora_mid.weight": "lora_mid",  # unknown suffix
        "lora_unet_up_blocks_0_attentions_0_proj_in.lora_up.weight": "no lora_down",  # orphan up
        "model.diffusion_model.x.weight": "mixes layouts",
    }
    for bad, why in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file({**good, bad: torch.ones(64, 2)}, path)
        with pytest.raises(AdapterFormatError, match=bad.split(".")[0]) as err:
            read_adapter(path)
        assert why in str(err.value) or why in ("lora_mid",), str(err.value)
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.ones(2, 64),
               "unet.down_blocks.1.attentions.0.proj_in.lora_C.weight": torch.ones(64, 2)}, path)
    with pytest.raises(AdapterFormatError, match="lora_C"):
        read_adapter(path)
    # a module the base does not have, or one with other sizes: a different base model
    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2)}, path)
    with pytest.raises(AdapterFormatError, match=r"down_blocks.7.attentions.0.proj_in.*different base"):
        check_base(read_adapter(path), {"unet": pipe.unet}, str(path))
    save_file({**{k: torch.ones(2, 1280) if "lora_down" in k else torch.ones(1280, 2) for k in good}}, path)
    with pytest.raises(AdapterFormatError, match=r"down_blocks.1.attentions.0.proj_in.*\(1280, 1280\)"):
        check_base(read_adapter(path), {"unet": pipe.unet}, str(path))


def test_kohya_sgm_block_names_map_to_diffusers_modules(pipe):
    from dreambooth_pl.adapter.kohya_layout import from_kohya

    def one(name: str) -> dict:
        return {f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.ones(64, 2),
                f"{name}.alpha": torch.tensor(1.0)}

    # sd-scripts names SDXL's UNet as SGM does: input_blocks_4_1 is down_blocks.1.attentions.0 (2 layers per block)
    sdxl = from_kohya(one("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"))
    assert sdxl.modules() == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    tiny = from_kohya(one("lora_unet_output_blocks_1_1_proj_in"), pipe.unet.config)  # tiny base: 1 layer per block
    assert tiny.modules() == ["unet.up_blocks.0.attentions.1.proj_in"]
    check_base(tiny, {"unet": pipe.unet})
    assert float(tiny.alphas[tiny.modules()[0]]) == 1.0 and tiny.scale(tiny.modules()[0]) == 0.5


def test_a_pickle_named_safetensors_is_refused_unopened(tmp_path):
    from dreambooth_pl.io import UnsafeFileError

    path = tmp_path / "hostile.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, path)
    with pytest.raises(UnsafeFileError, match="pickle inside"):
        read_adapter(path)


def _one_module_file(path, a, b, metadata=None):
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b}, path,
              metadata=dict({"format": "pt"}, **(metadata or {})))
    return path


@pytest.mark.parametrize("a, b, meta, message", [
    (torch.ones(2, 64, dtype=torch.int8), torch.ones(64, 2), None, r"lora_A\.weight' has dtype torch\.int8"),
    (torch.ones(2, 64, 1, 1, 1), torch.ones(64, 2), None, r"lora_A\.weight' has shape \(2, 64, 1, 1, 1\)"),
    (torch.full((2, 64), float("nan")), torch.ones(64, 2), None, r"lora_A\.weight' holds NaN or inf"),
    (torch.ones(2, 64), torch.full((64, 2), float("inf")), None, r"lora_B\.weight' holds NaN or inf"),
    (torch.ones(2, 64), torch.ones(64, 2), {"lora_adapter_metadata": '{"unet.lora_alpha": 1e30}'},
     r"alpha 1e\+30 for rank 2"),
    (torch.ones(2, 64), torch.ones(64, 2), {"lora_adapter_metadata": "{not json"}, r"bad\.safetensors.*invalid JSON"),
    (torch.ones(2, 64), torch.ones(64, 2), {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000},
     r"bad\.safetensors.*nested too deeply"),
])
def test_broken_values_and_headers_are_refused_by_name(tmp_path, a, b, meta, message):
    """int8 or 5-D factors, NaN/inf weights, an absurd alpha (black images, exit 0) or a broken JSON header."""
    path = _one_module_file(tmp_path / "bad.safetensors", a, b, meta)
    with pytest.raises(ValueError, match=message):
        read_adapter(path)


def test_a_conv_shaped_factor_on_a_linear_layer_is_named(pipe, tmp_path):
    path = _one_module_file(tmp_path / "conv.safetensors", torch.ones(2, 64, 1, 1), torch.ones(64, 2, 1, 1))
    lora = read_adapter(path)
    with pytest.raises(AdapterFormatError, match=r"to_q\.lora_A\.weight is 4-D but the base's .* weight is 2-D"):
        check_base(lora, {"unet": pipe.unet})


def test_a_full_disk_while_exporting_names_the_file(tmp_path):
    from test_io import file_size_limit

    from dreambooth_pl.io import WriteError

    lora = read_adapter(_one_module_file(tmp_path / "in.safetensors", torch.ones(2, 64), torch.ones(64, 2)))
    lora.weights = {k: v.repeat(1, 100) if k.endswith("A.weight") else v for k, v in lora.weights.items()}
    with file_size_limit(16 * 1024), pytest.raises(WriteError, match=r"out\.safetensors.*full"):
        write_adapter(lora, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
