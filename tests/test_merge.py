"""Merging: cat = both adapters at once (diffusers set_adapters), svd at full rank = cat, ties/dare = peft's
add_weighted_adapter, fuse = the unfused adapters, mismatched bases named."""
from __future__ import annotations

import pytest
import torch
from test_files import load_unet, pipe, random_lora, unet_out  # noqa: F401  (pipe is a fixture)

from dreambooth_pl.__main__ import main
from dreambooth_pl.adapter.files import read_adapter, write_adapter
from dreambooth_pl.adapter.value import Adapter, AdapterFormatError, from_models, uniform_alpha
from dreambooth_pl.tools.merge import merge, merge_loras, parse_spec

STYLE_TARGETS = ("to_v", "to_out.0", "proj_in", "proj_out")  # overlaps the subject's q/k/v/out on two modules


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """(subject file in diffusers layout, style file in kohya layout): different ranks, alphas, targets."""
    root = tmp_path_factory.mktemp("adapters")
    subject = from_models({"unet": random_lora(load_unet(tiny_base), seed=11, rank=4, alpha=4.0)})
    style = from_models({"unet": random_lora(load_unet(tiny_base), seed=12, rank=2, alpha=1.0,
                                             targets=STYLE_TARGETS)})
    return (str(write_adapter(subject, root / "subject.safetensors", "diffusers")),
            str(write_adapter(uniform_alpha(style), root / "style.safetensors", "kohya")))


def both_at_once(pipe, files, weights) -> torch.Tensor:
    """UNet output with every file loaded as its own adapter, mixed by diffusers ``set_adapters``."""
    names = [f"m{i}" for i in range(len(files))]
    for f, n in zip(files, names):
        pipe.load_lora_weights(f, adapter_name=n)
    try:
        pipe.set_adapters(names, list(weights))
        return unet_out(pipe.unet)
    finally:
        pipe.delete_adapters(names)


def loaded(pipe, file) -> torch.Tensor:
    pipe.load_lora_weights(file, adapter_name="merged")
    try:
        return unet_out(pipe.unet)
    finally:
        pipe.delete_adapters("merged")


def test_parse_spec():
    assert parse_spec("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert parse_spec("b.safetensors") == ("b.safetensors", 1.0)
    with pytest.raises(ValueError, match="after the last ':'"):
        parse_spec("b.safetensors:strong")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_cat_equals_both_adapters_at_once(pipe, adapters, tmp_path, fmt):
    out = tmp_path / "cat.safetensors"
    main(["merge", f"{adapters[0]}:1.0", f"{adapters[1]}:0.8", "--method", "cat", "--out", str(out),
          "--format", fmt])  # the command line, positional specs included
    merged = read_adapter(out)
    subject, style = read_adapter(adapters[0]), read_adapter(adapters[1])
    assert set(merged.modules()) == set(subject.modules()) | set(style.modules())  # union of targets
    shared = next(m for m in style.modules() if m in subject.modules())
    assert merged.rank(shared) == subject.rank(shared) + style.rank(shared)
    expected = both_at_once(pipe, adapters, [1.0, 0.8])
    assert (expected - unet_out(pipe.unet)).abs().max() > 1e-2
    torch.testing.assert_close(loaded(pipe, str(out)), expected, atol=1e-4, rtol=0)


def test_svd_full_rank_equals_cat_and_truncates(adapters):
    loras = [read_adapter(f) for f in adapters]
    cat = merge_loras(loras, [1.0, 0.8], "cat")
    full = merge_loras(loras, [1.0, 0.8], "svd", rank=6)
    low = merge_loras(loras, [1.0, 0.8], "svd")  # default: the largest input rank (4)
    for m in cat.modules():
        torch.testing.assert_close(full.delta(m), cat.delta(m), atol=1e-5, rtol=0)
        assert low.rank(m) == min(4, cat.rank(m))
    worst = max((low.delta(m) - cat.delta(m)).norm() / cat.delta(m).norm() for m in cat.modules())
    assert 0 < worst < 1  # truncation loses the smallest singular directions only


def peft_pair():
    """A peft model with two seeded non-zero adapters ("default", "b") of equal rank on two linear layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8))
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=1.5, target_modules=["0", "2"], init_lora_weights=False))
    return model, [from_models({"unet": model.base_model.model}, name) for name in ("default", "b")]


# dare at density 1 keeps every entry, so it is deterministic and comparable; at < 1 peft's own adapter
# initialisation draws from the RNG before its drop masks, so the masks cannot be matched draw for draw.
@pytest.mark.parametrize("method,density", [("linear", 0.6), ("svd", 0.6), ("ties", 0.6), ("ties_svd", 0.6),
                                            ("dare_linear", 1.0), ("dare_ties", 1.0), ("dare_ties_svd", 1.0)])
def test_task_arithmetic_methods_match_peft_add_weighted_adapter(method, density):
    model, loras = peft_pair()
    model.add_weighted_adapter(["default", "b"], [1.0, -0.7], "m", combination_type=method, density=density)
    ours = merge_loras(loras, [1.0, -0.7], method, density=density)
    theirs = from_models({"unet": model.base_model.model}, "m")
    for m in ours.modules():
        torch.testing.assert_close(ours.delta(m), theirs.delta(m), atol=1e-5, rtol=1e-5)


def test_dare_drops_at_the_density_and_is_seeded(adapters, tmp_path):
    out = [merge(list(adapters), str(tmp_path / f"d{i}.safetensors"), "dare_linear_svd", density=0.3, seed=s)
           for i, s in enumerate((1, 1, 2))]
    a, b, c = (read_adapter(p) for p in out)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert any(not torch.equal(a.weights[k], c.weights[k]) for k in a.weights)
    _, loras = peft_pair()
    torch.manual_seed(0)
    dropped = merge_loras(loras, [1.0, 1.0], "dare_linear", density=0.3)
    zeros = sum((dropped.down(m) == 0).sum().item() for m in dropped.modules())
    total = sum(dropped.down(m).numel() for m in dropped.modules())
    assert 0.3 < zeros / total < 0.7  # each input keeps 30%: about 0.7 ** 2 = 49% of the sum is dropped


def test_fuse_equals_unfused_adapters(pipe, adapters, tiny_base, tmp_path):
    from diffusers import UNet2DConditionModel

    out = merge([f"{adapters[0]}:1.0", f"{adapters[1]}:0.5"], str(tmp_path / "fused"), "fuse", base=tiny_base)
    fused = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    assert not any("lora" in n for n, _ in fused.named_parameters())  # baked in, no adapter layers left
    torch.testing.assert_close(unet_out(fused), both_at_once(pipe, adapters, [1.0, 0.5]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs --base"):
        merge([adapters[0]], str(tmp_path / "f2"), "fuse")
    again = [f"{adapters[0]}:1.0"]
    with pytest.raises(OSError, match="already exists and was built by dreambooth_pl.*--overwrite"):
        merge(again, out, "fuse", base=tiny_base)  # its own earlier output: replaced only when asked
    assert merge(again, out, "fuse", base=tiny_base, overwrite=True) == out


def test_fuse_never_deletes_folders_it_did_not_create(adapters, tiny_base, tmp_path, monkeypatch):
    """``merge --method fuse --out .`` once deleted the current folder, inputs included; EXISTING_DIR was replaced."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    lora = shutil.copy(adapters[0], work / "l.safetensors")
    (work / "notes.txt").write_text("mine")
    user = tmp_path / "existing"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    monkeypatch.chdir(work)
    with pytest.raises(OSError, match="current folder"):
        main(["merge", "l.safetensors:1.0", "--method", "fuse", "--base", tiny_base, "--out", ".", "--overwrite",
              "true"])
    with pytest.raises(OSError, match="not created by dreambooth_pl.*--overwrite"):
        merge([f"{lora}:1.0"], str(user), "fuse", base=tiny_base)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="holds the input"):
        merge([f"{lora}:1.0"], str(tmp_path / "work"), "fuse", base=str(tiny_base), overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["l.safetensors", "notes.txt"]
    assert (user / "thesis.txt").read_text() == "years of work"


def test_mismatched_bases_and_ranks_are_clear_errors(adapters, tmp_path, tiny_base):
    subject = read_adapter(adapters[0])
    m = subject.modules()[0]
    other = Adapter({f"{m}.lora_A.weight": torch.ones(2, 1280), f"{m}.lora_B.weight": torch.ones(1280, 2)})
    other_file = str(write_adapter(other, tmp_path / "sdxl_sized.safetensors"))
    with pytest.raises(AdapterFormatError, match=rf"{m}.*different base"):
        merge([adapters[0], other_file], str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterFormatError, match="sdxl_sized.*different base"):
        merge([other_file], str(tmp_path / "x.safetensors"), base=tiny_base)
    with pytest.raises(ValueError, match="needs equal ranks.*ties_svd"):
        merge_loras([subject, read_adapter(adapters[1])], [1.0, 1.0], "ties")
    assert not (tmp_path / "x.safetensors").exists()  # a failed merge writes nothing
