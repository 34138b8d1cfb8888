"""EMA of the adapter weights: equals a hand-computed EMA, exports averaged or raw weights, drives sampling."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import fit_args, write_images

from dreambooth_pl.ema import AdapterEMA
from dreambooth_pl.sampling import SamplerSettings


def test_update_equals_the_hand_formula_and_applied_restores_raw_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = AdapterEMA({"w": p}, decay=0.9)
    hand = p.detach().clone()
    for value in ([3.0, 0.0], [0.5, 4.0], [-1.0, 2.0]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        hand = 0.9 * hand + 0.1 * torch.tensor(value)
    torch.testing.assert_close(ema.shadow["w"], hand, rtol=0, atol=1e-6)
    assert ema.num_updates == 3
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow["w"])
    assert torch.equal(p.detach(), torch.tensor([-1.0, 2.0]))


def test_bad_decay_and_mismatched_state_are_named():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="model.ema.decay"):
        AdapterEMA({"w": p}, 1.0)
    ema = AdapterEMA({"w": p}, 0.9)
    with pytest.raises(ValueError, match="'v'"):
        ema.load_state_dict({"decay": 0.9, "num_updates": 1, "shadow": {"v": torch.zeros(1)}})
    with pytest.raises(ValueError, match="same decay"):
        ema.load_state_dict({"decay": 0.5, "num_updates": 1, "shadow": {"w": torch.zeros(1)}})


class Record(L.Callback):
    """The raw trainable weights before training and after every step."""

    def __init__(self):
        self.weights = []

    def _take(self, pl_module):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.trainable_parameters().items()})

    def on_train_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._take(pl_module)


@pytest.mark.parametrize("export_ema", [True, False])
def test_fit_exports_the_hand_computed_ema_or_the_raw_weights(tiny_base, tmp_path, export_ema):
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.adapter.files import read_adapter

    write_images(tmp_path / "instance", 2, seed=5)
    args = fit_args(tiny_base, str(tmp_path / "instance"), None, str(tmp_path), steps=3,
                    **{"model.ema.decay": 0.6, "model.ema.export": export_ema, "model.optim.learning_rate": 1e-2})
    cli = DreamBoothCLI(args=args[1:], run=False)
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    hand = dict(record.weights[0])
    for w in record.weights[1:]:
        hand = {k: 0.6 * hand[k] + 0.4 * w[k] for k in hand}
    for k, v in cli.model.ema.shadow.items():
        torch.testing.assert_close(v, hand[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(hand[k], record.weights[-1][k]) for k in hand)  # the EMA differs from raw
    exported = read_adapter(Path(cli.trainer.log_dir) / "pytorch_lora_weights.safetensors")
    want = hand if export_ema else record.weights[-1]
    name = next(k for k in want if "lora_B" in k)  # unet.<module>.lora_B.default.weight
    module = name.split(".", 1)[1].rsplit(".lora_B", 1)[0]
    torch.testing.assert_close(exported.up(f"unet.{module}"), want[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(cli.model.trainable_parameters()[name], record.weights[-1][name])  # raw weights kept
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(ckpt["ema"]["shadow"][name], cli.model.ema.shadow[name])
    from dreambooth_pl.adapter.checkpoint import read_checkpoint

    from_ckpt = read_checkpoint(str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"))
    exported_weights = cli.model.ema.shadow if export_ema else record.weights[-1]
    assert torch.equal(from_ckpt.up(f"unet.{module}"), exported_weights[name])


def test_sample_grid_draws_with_the_ema_weights(tiny_base):
    from dreambooth_pl.callbacks.sample_grid import SampleGrid
    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import EmaSettings, LoraSettings

    m = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False), ema=EmaSettings(decay=0.5))
    m.configure_model()
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.mul_(3.0)  # raw weights move away from the average (still the initial weights)
    import numpy as np

    raw = {k: v.clone() for k, v in m.trainable_parameters().items()}
    def draw():
        grid = SampleGrid(prompts=["a photo of sks dog"], sampler=SamplerSettings(steps=2), resolution=32)
        return np.asarray(grid.draw(None, m)[0])

    drawn = draw()
    assert all(torch.equal(raw[k], v) for k, v in m.trainable_parameters().items())  # raw weights put back
    ema, m.ema = m.ema, None  # EMA off: the grid draws whatever the weights hold
    with_raw = draw()
    with ema.applied():
        with_average = draw()
    m.ema = ema
    assert np.array_equal(drawn, with_average) and not np.array_equal(drawn, with_raw)
