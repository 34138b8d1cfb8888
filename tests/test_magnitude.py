"""io/magnitude.py: a finite but absurd LoRA (lora_B = 1e30) is refused by sample and merge, by module, with
--force to override; working adapters pass."""
from __future__ import annotations

import pytest
import torch
from test_files import _one_module_file  # noqa: F401

from dreambooth_pl.__main__ import main
from dreambooth_pl.io.magnitude import MAX_NORM, MagnitudeError, check_magnitude, delta_norm

MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("down_shape, up_shape", [((3, 20), (12, 3)), ((3, 5, 3, 3), (7, 3, 1, 1))])
def test_delta_norm_is_the_norm_of_the_product(down_shape, up_shape):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g)
    full = 0.5 * up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
    assert delta_norm(down, up, 0.5) == pytest.approx(float(full.norm()), rel=1e-9)  # float64 both ways
    # no overflow; the factor is rounded to float32 (relative error ~6e-8)
    assert delta_norm(down, up * 1e30, 1.0) == pytest.approx(float(full.norm()) * 2e30, rel=1e-6)


def test_bounds_relative_to_the_base_and_absolute_without_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    small = {f"{MODULE}.lora_A.weight": 0.01 * torch.randn(4, 64, generator=g),
             f"{MODULE}.lora_B.weight": 0.01 * torch.randn(64, 4, generator=g)}
    check_magnitude(small, {}, "small.safetensors", {MODULE: w})
    check_magnitude(small, {}, "small.safetensors")
    huge = dict(small, **{f"{MODULE}.lora_B.weight": torch.full((64, 4), 1e30)})
    with pytest.raises(MagnitudeError, match=rf"huge.safetensors: module '{MODULE}' would change its layer by "
                                             r"‖ΔW‖ = .*e\+3\d, .* times the base weight's.*--force"):
        check_magnitude(huge, {}, "huge.safetensors", {MODULE: w})
    with pytest.raises(MagnitudeError, match=f"beyond the bound of {MAX_NORM:g}"):
        check_magnitude(huge, {}, "huge.safetensors")
    check_magnitude(huge, {}, "huge.safetensors", force=True)
    check_magnitude(huge, {}, "huge.safetensors", scale=0.0)  # a LoRA applied at scale 0 changes nothing
    # 11x the base weight is past the bound, 9x is not
    unit = {f"{MODULE}.lora_A.weight": torch.eye(64)[:1], f"{MODULE}.lora_B.weight": torch.eye(64)[:, :1]}
    base = torch.eye(64)[:, :1] @ torch.eye(64)[:1]  # ‖W‖ = 1 = ‖B A‖
    check_magnitude(unit, {MODULE: torch.tensor(9.0)}, "nine.safetensors", {MODULE: base})
    with pytest.raises(MagnitudeError, match="11 times"):
        check_magnitude(unit, {MODULE: torch.tensor(11.0)}, "eleven.safetensors", {MODULE: base})


@pytest.fixture
def absurd(tmp_path) -> str:
    """The issue's file: finite, lora_B = 1e30 (NaN/inf are refused elsewhere)."""
    return str(_one_module_file(tmp_path / "absurd.safetensors", torch.ones(2, 64), torch.full((64, 2), 1e30)))


def test_sample_refuses_it(absurd, tiny_base, tmp_path):
    args = ["sample", "--base", tiny_base, "--lora", absurd, "--prompt", "a dog", "--sampler.steps", "1",
            "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "out")]
    with pytest.raises(MagnitudeError, match=r"absurd.safetensors: module .*to_q' would change its layer .* times "
                                             "the base weight"):
        main(args)
    assert not list((tmp_path / "out").glob("*.png"))
    main(args + ["--force", "true", "--overwrite", "true"])  # the override works (and draws from it)
    assert len(list((tmp_path / "out").glob("0000_*.png"))) == 1


def test_merge_refuses_it(absurd, tmp_path):
    good = str(_one_module_file(tmp_path / "good.safetensors", 0.01 * torch.ones(2, 64), 0.01 * torch.ones(64, 2)))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MagnitudeError, match="absurd.safetensors: module"):
        main(["merge", good, absurd, "--method", "cat", "--out", str(out)])
    assert not out.exists()
    main(["merge", good, "--method", "cat", "--out", str(out)])
    assert out.exists()
