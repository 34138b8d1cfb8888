"""Exponential moving average of the trainable (adapter) weights, through ``torch.optim.swa_utils``.

Only the adapters are averaged (megabytes), not the frozen base, unlike Lightning's ``EMAWeightAveraging`` which
deep-copies the whole module. The average is held by the LightningModule and checkpointed beside its weights, so
a resumed run continues the same average.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class AdapterEMA:
    """``ema_0 = w_0``, ``ema_t = decay * ema_{t-1} + (1 - decay) * w_t`` after every optimizer step
    (``torch.optim.swa_utils.get_ema_multi_avg_fn``; Polyak & Juditsky 1992).

    Args:
        params: name -> trainable parameter (the average starts as a copy of them).
        decay: weight of the old average per step, in [0, 1).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.ema.decay must be in [0, 1) or null (off), got {decay}")
        self.decay, self.params = decay, params
        self.shadow = {n: p.detach().clone() for n, p in params.items()}
        self.num_updates = 0
        self._avg = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        self._follow_device()
        names = list(self.params)
        self._avg([self.shadow[n] for n in names], [self.params[n].detach() for n in names], self.num_updates)
        self.num_updates += 1

    def _follow_device(self) -> None:
        """The average lives where its parameters do (the module moves to the GPU after it is built)."""
        for n, p in self.params.items():
            if self.shadow[n].device != p.device:
                self.shadow[n] = self.shadow[n].to(p.device)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore a saved average; names the mismatch when the checkpoint's adapters differ from these."""
        if set(state["shadow"]) != set(self.shadow):
            diff = sorted(set(state["shadow"]) ^ set(self.shadow))
            raise ValueError(f"{source}: its EMA weights do not match this model's adapters (first difference "
                             f"{diff[0]!r}); resume with the config the checkpoint was trained with.")
        if float(state["decay"]) != self.decay:
            raise ValueError(f"{source}: EMA decay was {state['decay']} but model.ema.decay is {self.decay}; resume "
                             "with the same decay (a changed decay would not continue the same average).")
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
        self.num_updates = int(state["num_updates"])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; the raw weights are put back on exit."""
        self._follow_device()
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            _copy_into(self.params, self.shadow)
            yield
        finally:
            _copy_into(self.params, raw)


@torch.no_grad()
def _copy_into(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for n, p in params.items():
        p.copy_(values[n])
