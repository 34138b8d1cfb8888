"""devices.py: borrowed moves only the modules that are elsewhere, and each back home, even when the block fails; the
GPU memory a process may still take honours a per-process cap."""
from __future__ import annotations

import pytest
import torch

from dreambooth_pl import devices
from dreambooth_pl.devices import borrowed, to_cpu


class _Placed(torch.nn.Module):
    """A module that records where it is told to go (no second device is needed to test the moves)."""

    def __init__(self, device: str):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.where, self.moves = torch.device(device), []

    def parameters(self, recurse: bool = True):
        yield torch.empty(0, device="meta") if self.where.type == "meta" else self.p

    def to(self, device):
        self.where = torch.device(device)
        self.moves.append(str(device))
        return self


def test_borrowed_moves_what_is_elsewhere_and_back():
    home, away = _Placed("cpu"), _Placed("meta")
    with pytest.raises(RuntimeError, match="inside"):
        with borrowed((home, away), torch.device("cpu")):
            assert away.where.type == "cpu" and home.moves == []
            raise RuntimeError("inside")
    assert away.moves == ["cpu", "meta"] and home.moves == []


def test_to_cpu_moves_every_module():
    a, b = _Placed("meta"), _Placed("meta")
    to_cpu(a, b)
    assert a.moves == b.moves == ["cpu"]


@pytest.mark.parametrize("fraction, reserved, expect", [(1.0, 0, 70.0), (0.1, 2, 6.0), (0.1, 9, 0.0)])
def test_free_memory_honours_a_per_process_cap(monkeypatch, fraction, reserved, expect):
    """An 80 GiB card with 70 GiB free: uncapped, the driver's figure; capped to 8 GiB with 2 GiB already reserved,
    6 GiB (the capped benchmark's run once parked nothing on that figure); past the cap, none."""
    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved * GiB)
    assert devices.free_gib(torch.device("cuda", 0)) == pytest.approx(expect)
