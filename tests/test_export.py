"""export: a fit's Lightning checkpoint (weights_only) -> diffusers/kohya files equal to the fit's own export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fit_args
from safetensors.torch import load_file

from dreambooth_pl.__main__ import main
from dreambooth_pl.adapter.files import detect_layout, read_adapter
from dreambooth_pl.adapter.value import AdapterFormatError
from dreambooth_pl.io import CheckpointError
from dreambooth_pl.adapter.checkpoint import read_checkpoint
from dreambooth_pl.tools.export import export


@pytest.fixture(scope="module")
def fitted(tiny_base, tmp_path_factory):
    """(last.ckpt, the LoRAExport file) of a 1-step fit with alpha 2 != rank 4."""
    from dreambooth_pl.cli import DreamBoothCLI

    root = tmp_path_factory.mktemp("fit")
    inst = root / "instance"
    from conftest import write_images

    write_images(inst, 2, seed=3)
    DreamBoothCLI(args=fit_args(tiny_base, str(inst), None, str(root), steps=1, **{"model.lora.alpha": 2}))
    run = next(Path(root).glob("lightning_logs/version_*"))
    return str(run / "checkpoints" / "last.ckpt"), str(run / "pytorch_lora_weights.safetensors")


def same(a, b) -> None:
    assert set(a.modules()) == set(b.modules())
    for m in a.modules():
        assert float(a.alphas[m]) == float(b.alphas[m]), m
        torch.testing.assert_close(a.delta(m), b.delta(m), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_checkpoint_export_equals_fit_export(fitted, tmp_path, fmt, tiny_base):
    ckpt, fit_file = fitted
    out = tmp_path / f"{fmt}.safetensors"
    main(["export", "--source", ckpt, "--out", str(out), "--format", fmt, "--base", tiny_base])
    assert detect_layout(load_file(out)) == fmt
    ours, reference = read_adapter(out), read_adapter(fit_file)
    assert {float(a) for a in ours.alphas.values()} == {2.0}  # lora.alpha from the checkpoint's hparams
    same(ours, reference)
    assert any(reference.up(m).abs().max() > 0 for m in reference.modules())


def test_file_to_file_and_dtype(fitted, tmp_path):
    _, fit_file = fitted
    kohya = export(fit_file, str(tmp_path / "k.safetensors"), "kohya", dtype="float16")
    assert {v.dtype for k, v in load_file(kohya).items() if not k.endswith(".alpha")} == {torch.float16}
    back = read_adapter(export(kohya, str(tmp_path / "d.safetensors"), "diffusers"))
    ref = read_adapter(fit_file)
    for m in ref.modules():
        torch.testing.assert_close(back.delta(m), ref.delta(m), atol=1e-3, rtol=1e-2)  # fp16 storage


def test_bad_checkpoints_are_named(tmp_path, fitted):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"unet.conv_in.weight": torch.ones(1)}}, bad)
    with pytest.raises(AdapterFormatError, match="unet.conv_in.weight"):
        read_checkpoint(str(bad))
    torch.save({"state_dict": {}, "callbacks": {"x": object()}}, bad)  # needs a full unpickler
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as err:
        read_checkpoint(str(bad))
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        export(str(tmp_path / "missing.safetensors"), str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("layout", ["grouped", "flat"])
def test_grouped_and_old_flat_checkpoints_export_alike(fitted, tmp_path, layout):
    """A fit's checkpoint holds its settings groups as plain dicts; checkpoints from before settings.py hold flat
    keys (adapter, lora_rank, lora_alpha, ema_decay, ema_export). export reads both: alpha, type and EMA choice."""
    ckpt = torch.load(fitted[0], weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (hp["lora"]["adapter"], hp["lora"]["rank"], hp["lora"]["alpha"], hp["ema"]["decay"]) == ("lora", 4, 2, None)
    if layout == "flat":
        hp = {k: v for k, v in hp.items() if k not in ("lora", "optim", "ema", "perf")}
        hp.update(adapter="lora", lora_rank=4, lora_alpha=2.0, ema_decay=0.5, ema_export=True)
    else:
        hp["ema"] = {"decay": 0.5, "export": True}
    # an EMA entry whose weights are twice the raw ones: the export must take it
    ckpt["ema"] = {"decay": 0.5, "num_updates": 1, "shadow": {k: 2 * v for k, v in ckpt["state_dict"].items()}}
    path = tmp_path / f"{layout}.ckpt"
    torch.save({**ckpt, "hyper_parameters": hp}, path)
    raw, averaged = read_checkpoint(fitted[0]), read_checkpoint(str(path))
    assert {float(a) for a in averaged.alphas.values()} == {2.0}
    for m in raw.modules():
        torch.testing.assert_close(averaged.up(m), 2 * raw.up(m))
    hp = {**hp, "adapter": "dora"} if layout == "flat" else {**hp, "lora": {**hp["lora"], "adapter": "dora"}}
    torch.save({**ckpt, "hyper_parameters": hp}, path)
    with pytest.raises(AdapterFormatError, match="no lora_magnitude_vector"):  # the kind comes from the settings
        read_checkpoint(str(path))
