"""Optimizers: Prodigy's step-size estimate moves from d0, is logged, and survives a state_dict round trip and a
resumed fit bit for bit."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_args, write_images
from safetensors.torch import load_file

from dreambooth_pl.optimizers import build_optimizer, step_size_estimates


def _quadratic_steps(opt, p, n):
    for _ in range(n):
        opt.zero_grad()
        ((p - 3.0) ** 2).sum().backward()
        opt.step()


def test_prodigy_estimate_moves_and_its_state_round_trips_exactly():
    torch.manual_seed(0)
    init = torch.randn(16)
    make = lambda p: build_optimizer("prodigy", [{"params": [p], "lr": 1.0}], 0.0, torch.device("cpu"))  # noqa: E731
    p_ref = torch.nn.Parameter(init.clone())
    ref = make(p_ref)
    assert step_size_estimates(ref) == {"train/prodigy_d_lr/pg0": pytest.approx(1e-6)}  # d0 before any step
    _quadratic_steps(ref, p_ref, 40)
    d = step_size_estimates(ref)["train/prodigy_d_lr/pg0"]
    assert d > 1e-5, d  # the estimate grew more than tenfold from d0 = 1e-6 (measured: 3.1e-5 at step 40)

    p_a = torch.nn.Parameter(init.clone())
    a = make(p_a)
    _quadratic_steps(a, p_a, 20)
    state = a.state_dict()
    p_b = torch.nn.Parameter(p_a.detach().clone())
    b = make(p_b)
    b.load_state_dict(state)
    _quadratic_steps(b, p_b, 20)
    assert torch.equal(p_b, p_ref)
    assert b.param_groups[0]["d"] == ref.param_groups[0]["d"]


def test_adamw_reports_no_estimate_and_low_prodigy_lr_warns():
    p = torch.nn.Parameter(torch.zeros(2))
    assert step_size_estimates(build_optimizer("adamw", [{"params": [p], "lr": 1e-4}], 0.0,
                                               torch.device("cpu"))) == {}
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):  # 8-bit AdamW off the GPU: torch AdamW
        assert type(build_optimizer("adamw8bit", [{"params": [p], "lr": 1e-4}], 0.0, torch.device("cpu"))) \
            is torch.optim.AdamW
    with pytest.raises(ValueError, match="prodigy"):
        build_optimizer("sgd", [{"params": [p], "lr": 1e-4}], 0.0, torch.device("cpu"))
    with pytest.warns(UserWarning, match="learning_rate: 1.0"):
        build_optimizer("prodigy", [{"params": [p], "lr": 1e-4}], 0.0, torch.device("cpu"))


def test_adam_betas_and_epsilon_reach_each_optimizer_and_bad_ones_are_refused():
    from dreambooth_pl.settings import OptimSettings

    p = torch.nn.Parameter(torch.zeros(2))
    for name in ("adamw", "prodigy"):
        opt = build_optimizer(name, [{"params": [p], "lr": 1.0}], 0.0, torch.device("cpu"), (0.8, 0.95), 1e-6)
        assert tuple(opt.defaults["betas"]) == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="optim.adam_epsilon must be > 0"):
        OptimSettings(adam_epsilon=0.0)
    with pytest.raises(ValueError, match="optim.adam_betas must be two values in"):
        OptimSettings(adam_betas=(0.9, 1.0))


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prodigy") / "instance"
    write_images(folder, 2, seed=4)
    return str(folder)


def _fit(base, inst, root, steps, *extra):
    from dreambooth_pl.cli import DreamBoothCLI

    args = fit_args(base, inst, None, str(root), steps=steps, **{"model.optim.name": "prodigy",
                                                                 "model.optim.learning_rate": 1.0,
                                                                 "model.ema.decay": 0.5, "data.crops.flip": 0.5})
    return DreamBoothCLI(args=args + list(extra))


def test_prodigy_with_ema_logs_its_estimate_and_resumes_bit_exactly(tiny_base, instance_dir, tmp_path):
    ref = _fit(tiny_base, instance_dir, tmp_path / "ref", 3)
    logged = float(ref.trainer.callback_metrics["train/prodigy_d_lr/pg0"])
    assert logged == pytest.approx(ref.trainer.optimizers[0].param_groups[0]["d"])
    _fit(tiny_base, instance_dir, tmp_path / "ext", 2)
    run = tmp_path / "ext" / "lightning_logs" / "version_0"
    ckpt2 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "d_numerator" in ckpt2["optimizer_states"][0]["param_groups"][0] and ckpt2["ema"]["num_updates"] == 2
    from dreambooth_pl.cli import DreamBoothCLI

    DreamBoothCLI(args=["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                        "--trainer.max_steps=3"])
    a = load_file(run / "pytorch_lora_weights.safetensors")
    b = load_file(Path(tmp_path / "ref" / "lightning_logs" / "version_0" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c3 = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    r3 = torch.load(tmp_path / "ref" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                    weights_only=True)
    assert c3["optimizer_states"][0]["param_groups"][0]["d"] == r3["optimizer_states"][0]["param_groups"][0]["d"]
    assert all(torch.equal(c3["ema"]["shadow"][k], r3["ema"]["shadow"][k]) for k in r3["ema"]["shadow"])



class _Tiny(L.LightningModule):
    """A two-layer regression with the project's clipping hook and AdamW fused or multi-tensor."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        self.fused = fused

    def training_step(self, batch, _):
        x, y = batch
        return ((self.net(x).float() - y) ** 2).mean() * 100

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused, foreach=not self.fused)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from dreambooth_pl.optimizers import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_fused_adamw_clips_under_mixed_precision_as_lightning_clips_the_foreach_one(precision):
    """Lightning's mixed-precision plugin refuses to clip a fused AdamW (its step unscales the gradients itself; the
    recipe's ``gradient_clip_val: 1.0`` with ``optim.name: adamw`` stopped with that RuntimeError on the GPU).
    ``optimizers.clip_gradients`` unscales first and clips: 12 steps with fused AdamW equal 12 with the foreach
    kernels clipped by Lightning within fp32 rounding (3.7e-9 measured), the fp16 loss scaler's skipped overflow
    steps included (a 4096 start scale halves to 256), and the weights move."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning.pytorch.plugins.precision import MixedPrecision

    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 1, generator=g)), batch_size=8)
    start = torch.cat([p.detach().flatten() for p in _Tiny(False).parameters()])
    got, scales = {}, set()
    for fused in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if precision == "16-mixed" else None
        module = _Tiny(fused)
        trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision(precision, "cpu", scaler=scaler)],
                            max_steps=12, gradient_clip_val=0.5, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data)
        got[fused] = torch.cat([p.detach().flatten() for p in module.parameters()])
        scales.add(scaler.get_scale() if scaler else None)
        if fused:  # the case Lightning's plugin refuses on its own
            with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
                trainer.precision_plugin.clip_gradients(module.configure_optimizers(), 0.5)
    assert (got[True] - got[False]).abs().max().item() <= 1e-6
    assert (got[True] - start).abs().max().item() > 1e-2
    assert len(scales) == 1  # the same overflow steps skipped both ways
    assert scales.pop() < 2.0**12 if precision == "16-mixed" else scales == {None}
