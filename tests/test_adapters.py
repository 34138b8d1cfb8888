"""DoRA, LoKr and LoHa: each trains, exports in the layouts its consumers read, reloads to the same outputs, and
resumes bit for bit; formats and tools that cannot hold a type refuse it by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fit_args, write_images
from safetensors.torch import load_file

from dreambooth_pl import adapters, lycoris
from dreambooth_pl.formats import read_lora
from dreambooth_pl.lora_state import LoRAFormatError
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.settings import LoraSettings
from dreambooth_pl.sdxl import load_parts

KINDS = ["dora", "lokr", "loha"]


def _module(base, kind, **kw) -> DreamBoothLoRA:
    m = DreamBoothLoRA(base_model=base, lora=LoraSettings(kind, alpha=2, init=False, train_text_encoder=True), **kw)
    m.configure_model()
    return m


def _outputs(unet, te, te2, tokenizers) -> list[torch.Tensor]:
    """UNet noise prediction and both text encoders' hidden states on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    ids = [t(["a photo of sks dog"], padding="max_length", max_length=t.model_max_length, return_tensors="pt")
           .input_ids for t in tokenizers]
    with torch.no_grad():
        h1 = te(ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids[1], output_hidden_states=True)
        emb = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        x = torch.randn(1, 4, 8, 8, generator=gen)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        pred = unet(x, torch.tensor([500]), encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
    return [pred, h1, out2.hidden_states[-2]]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], adapted: list[torch.Tensor]) -> None:
    for x, y, z in zip(a, b, adapted):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    assert any(not torch.allclose(x, z, atol=1e-4) for x, z in zip(a, adapted))  # the adapters change outputs


@pytest.mark.parametrize("kind", KINDS)
def test_lycoris_export_reloads_to_the_same_outputs(tiny_base, tmp_path, kind):
    m = _module(tiny_base, kind)
    with torch.no_grad():  # DoRA's magnitude starts at the base norms: move it, so dora_scale is really read
        for n, p in m.trainable_parameters().items():
            if "magnitude" in n:
                p.mul_(1.5)
    trained = _outputs(m.unet, m.text_encoder, m.text_encoder_2, m.tokenizers)
    path = Path(m.export_lora(str(tmp_path / "out.safetensors"), "kohya"))
    sd = load_file(path)
    marker = {"dora": ".dora_scale", "lokr": ".lokr_w1", "loha": ".hada_w1_a"}[kind]
    assert any(k.startswith("lora_unet_") and k.endswith(marker) for k in sd)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any(k.startswith("lora_te2_") for k in sd)
    fresh = load_parts(tiny_base, None)
    plain = _outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, m.tokenizers)
    n = lycoris.apply_lycoris(path, {"unet": fresh.unet, "text_encoder": fresh.text_encoder,
                                     "text_encoder_2": fresh.text_encoder_2})
    assert n == len({k.split(".")[0] for k in sd})
    _close(_outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, m.tokenizers), trained, plain)


def test_lokr_with_two_full_factors_folds_alpha_over_r_into_w1():
    """peft scales a LoKr update by alpha / r even when no factor is decomposed; LyCORIS readers then scale by 1."""
    w1, w2 = torch.randn(2, 3), torch.randn(4, 5)
    sd = lycoris.to_lycoris({"lora_unet_x": ({"lokr_w1": w1, "lokr_w2": w2}, 2.0, 8)})
    base = torch.zeros(8, 15)
    got = lycoris.merged_weight({k.split(".", 1)[1]: v for k, v in sd.items()}, base)
    torch.testing.assert_close(got, 2.0 / 8 * torch.kron(w1, w2))


def test_dora_diffusers_export_loads_with_load_lora_weights(tiny_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    m = _module(tiny_base, "dora")
    with torch.no_grad():
        for n, p in m.trainable_parameters().items():
            if "magnitude" in n:
                p.mul_(1.5)
    trained = _outputs(m.unet, m.text_encoder, m.text_encoder_2, m.tokenizers)
    path = m.export_lora(str(tmp_path / "dora.safetensors"))  # auto: diffusers for DoRA
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(path))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base)
    plain = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, m.tokenizers)
    pipe.load_lora_weights(path)
    _close(_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, m.tokenizers), trained, plain)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_formats_and_tools_that_cannot_hold_a_type_refuse_it_by_name(tiny_base, tmp_path, kind):
    with pytest.raises(adapters.AdapterTypeError, match=f"cannot represent {kind.upper()}"):
        adapters.check_layout(kind, "diffusers")
    with pytest.raises(adapters.AdapterTypeError, match="model.lora.dropout"):
        LoraSettings(kind, dropout=0.1)
    m = _module(tiny_base, kind)
    path = m.export_lora(str(tmp_path / "x.safetensors"))
    with pytest.raises(LoRAFormatError, match={"lokr": "LoKr", "loha": "LoHa"}[kind]):
        read_lora(path)  # what merge, export and sample read


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters") / "instance"
    write_images(folder, 2, seed=6)
    return str(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_each_type_trains_and_resumes_bit_exactly(tiny_base, instance_dir, tmp_path, kind):
    from dreambooth_pl.cli import DreamBoothCLI

    def fit(root, steps):
        args = fit_args(tiny_base, instance_dir, None, str(root), steps=steps,
                        **{"model.lora.adapter": kind, "model.optim.learning_rate": 1e-2, "data.random_flip": 0.5})
        return DreamBoothCLI(args=args)

    ref = fit(tmp_path / "ref", 3)
    init = _module(tiny_base, kind).trainable_parameters() if kind == "dora" else None
    fit(tmp_path / "ext", 2)
    run = tmp_path / "ext" / "lightning_logs" / "version_0"
    two = load_file(run / "pytorch_lora_weights.safetensors")
    DreamBoothCLI(args=["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps=3"])
    a = load_file(run / "pytorch_lora_weights.safetensors")
    b = load_file(Path(ref.trainer.log_dir) / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(two[k], b[k]) for k in b)  # step 3 changed the weights: it trains
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    cr = torch.load(Path(ref.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    marker = adapters.PARAM_MARKERS[kind][-1]
    assert any(marker in k for k in ck) and all(torch.equal(ck[k], cr[k]) for k in cr)
    if init is not None:  # DoRA's magnitude is trained too
        k = next(k for k in cr if "magnitude" in k)
        assert not torch.equal(cr[k], init[k])
    if kind != "dora":
        with pytest.raises(LoRAFormatError, match=f"model.lora.adapter={kind}"):
            from dreambooth_pl.tools.export import read_checkpoint

            read_checkpoint(str(run / "checkpoints" / "last.ckpt"))
