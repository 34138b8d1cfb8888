"""LoRA, DoRA, LoKr and LoHa: each trains, exports in the layouts its consumers read (diffusers' load_lora_weights,
the LyCORIS package), reloads to the same outputs, resumes bit for bit, and every verb reads what fit wrote;
layouts that cannot hold a kind, and merges whose maths is undefined for it, refuse it by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fit_args, write_images
from safetensors.torch import load_file

from dreambooth_pl.adapter import kinds
from dreambooth_pl.adapter.files import LORA_FILE, read_adapter
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


def _close(a: list[torch.Tensor], b: list[torch.Tensor], adapted: list[torch.Tensor], atol: float = 2e-5) -> None:
    for x, y, z in zip(a, b, adapted):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert any(not torch.allclose(x, z, atol=1e-4) for x, z in zip(a, adapted))  # the adapters change outputs


def _moved(base, kind) -> DreamBoothLoRA:
    """A module with non-zero adapters; DoRA's magnitude (which starts at the base norms) moved, so it is read."""
    m = _module(base, kind)
    with torch.no_grad():
        for n, p in m.trainable_parameters().items():
            if "magnitude" in n:
                p.mul_(1.5)
    return m


def lycoris_apply(path, models: dict) -> int:
    """Apply a kohya/LyCORIS file with the LyCORIS package's own modules (forward path); returns the modules.

    Its ``merge_to`` scales LoHa twice (alpha / r squared, lycoris-lora 3.4-4.1.3), its forward once, as A1111
    and ComfyUI do; its kohya wrapper names text encoders without transformers 5's missing ``text_model`` level,
    so each component is given to the generic wrapper under its own module names.
    """
    from lycoris import create_lycoris_from_weights

    from dreambooth_pl.adapter.kohya_layout import kohya_name

    file, count = load_file(path), 0
    for comp, model in models.items():
        names = {kohya_name(comp, n): "lycoris_" + n.replace(".", "_") for n, _ in model.named_modules() if n}
        sd = {names[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in file.items()
              if k.split(".")[0] in names}
        net, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=sd)
        net.apply_to()
        count += len(net.loras)
    return count


@pytest.mark.parametrize("kind", KINDS)
def test_kohya_export_loads_in_the_lycoris_package_to_the_same_outputs(tiny_base, tmp_path, kind):
    pytest.importorskip("lycoris")
    m = _moved(tiny_base, kind)
    trained = _outputs(m.unet, m.text_encoder, m.text_encoder_2, m.tokenizers)
    path = Path(m.export_lora(str(tmp_path / "out.safetensors"), "kohya"))
    sd = load_file(path)
    marker = {"dora": ".dora_scale", "lokr": ".lokr_w1", "loha": ".hada_w1_a"}[kind]
    assert any(k.startswith("lora_unet_") and k.endswith(marker) for k in sd)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any(k.startswith("lora_te2_") for k in sd)
    fresh = load_parts(tiny_base, None)
    plain = _outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, m.tokenizers)
    n = lycoris_apply(path, {"unet": fresh.unet, "text_encoder": fresh.text_encoder,
                             "text_encoder_2": fresh.text_encoder_2})
    assert n == len({k.split(".")[0] for k in sd})
    _close(_outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2, m.tokenizers), trained, plain)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_diffusers_layout_loads_with_load_lora_weights_exactly(tiny_base, tmp_path, kind):
    from diffusers import StableDiffusionXLPipeline

    m = _moved(tiny_base, kind)
    trained = _outputs(m.unet, m.text_encoder, m.text_encoder_2, m.tokenizers)
    path = m.export_lora(str(tmp_path / f"{kind}.safetensors"))  # auto: diffusers for LoRA and DoRA
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(path)) is (kind == "dora")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base)
    plain = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, m.tokenizers)
    pipe.load_lora_weights(path)
    _close(_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, m.tokenizers), trained, plain, atol=1e-5)


def test_diffusers_reads_a_kohya_layout_dora_as_plain_lora(tiny_base, tmp_path):
    """What docs/merging.md says: diffusers (0.42) drops ``dora_scale`` from the kohya/LyCORIS layout, so such a
    file loads there as the LoRA of its A and B; exact readers of that layout are LyCORIS, A1111, ComfyUI and this
    project's sample. If diffusers learns the layout, this fails and the docs change."""
    from diffusers import StableDiffusionXLPipeline

    from dreambooth_pl.adapter.files import write_adapter
    from dreambooth_pl.adapter.value import Adapter

    m = _moved(tiny_base, "dora")
    with pytest.warns(UserWarning, match="drops dora_scale"):
        path = m.export_lora(str(tmp_path / "dora_kohya.safetensors"), "kohya")
    dora = read_adapter(path)
    as_lora = Adapter({k: v for k, v in dora.weights.items() if "magnitude" not in k}, dict(dora.alphas))
    lora_path = write_adapter(as_lora, tmp_path / "as_lora.safetensors", "kohya")
    outs = []
    for p in (path, lora_path):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base)
        pipe.load_lora_weights(str(p))
        outs.append(_outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, m.tokenizers))
    trained = _outputs(m.unet, m.text_encoder, m.text_encoder_2, m.tokenizers)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (outs[0][0] - trained[0]).abs().max() > 1e-3  # so diffusers is not an exact reader of this layout


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_layouts_and_merges_that_cannot_hold_a_kind_refuse_it_by_name(tiny_base, tmp_path, kind):
    from dreambooth_pl.tools.merge import merge

    with pytest.raises(kinds.AdapterTypeError, match=f"cannot represent {kinds.KINDS[kind].title}"):
        kinds.check_layout(kind, "diffusers")
    with pytest.raises(kinds.AdapterTypeError, match="model.lora.dropout"):
        LoraSettings(kind, dropout=0.1)
    m = _module(tiny_base, kind)
    path = m.export_lora(str(tmp_path / "x.safetensors"))
    assert read_adapter(path).kind == kind  # what merge, export and sample read
    with pytest.raises(kinds.AdapterTypeError, match=f"is a {kinds.KINDS[kind].title}.*--method svd"):
        merge([path, path], str(tmp_path / "m.safetensors"), method="cat")
    with pytest.raises(kinds.AdapterTypeError, match="of different kinds"):
        merge([path, str(_module(tiny_base, "lokr" if kind == "loha" else "loha").export_lora(
            str(tmp_path / "y.safetensors")))], str(tmp_path / "m.safetensors"), method="ties_svd")
    # svd sums full updates: defined for LoKr and LoHa, into a LoRA
    merged = read_adapter(merge([path], str(tmp_path / "svd.safetensors"), method="svd", rank=64))
    source = read_adapter(path)
    module = source.modules()[0]
    torch.testing.assert_close(merged.delta(module), source.delta(module), atol=1e-5, rtol=1e-4)


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
                        **{"model.lora.adapter": kind, "model.optim.learning_rate": 1e-2, "data.crops.flip": 0.5})
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
    marker = {"dora": "lora_magnitude_vector", "lokr": "lokr_w1", "loha": "hada_w1_a"}[kind]
    assert any(marker in k for k in ck) and all(torch.equal(ck[k], cr[k]) for k in cr)
    if init is not None:  # DoRA's magnitude is trained too
        k = next(k for k in cr if "magnitude" in k)
        assert not torch.equal(cr[k], init[k])
    from dreambooth_pl.adapter.checkpoint import read_checkpoint

    ckpt, exported = read_checkpoint(str(run / "checkpoints" / "last.ckpt")), read_adapter(run / LORA_FILE)
    assert ckpt.kind == exported.kind == kind and set(ckpt.modules()) == set(exported.modules())
    for m in ckpt.modules():  # export from the checkpoint writes what the fit wrote
        for p, v in ckpt.params(m).items():
            torch.testing.assert_close(v, exported.params(m)[p], atol=1e-6, rtol=1e-6)
