"""Each adapter kind's rank and weight update, from one layer's tensors in peft naming (``lora_A.weight``,
``lokr_w1``, ``hada_w1_a``, ...), as peft's layers and LyCORIS's readers (A1111, ComfyUI) compute them.

- LoRA (Hu et al. 2021, eq. 3): ``s B A``.
- DoRA (Liu et al. 2024, eq. 5): ``m (W + s B A) / ||W + s B A||`` with the norm over each output row.
- LoKr (Yeh et al. 2024): ``s kron(w1, w2)``, a factor given whole or as ``w_a w_b``.
- LoHa (Hyeon-Woo et al. 2022): ``s (w1_a w1_b) * (w2_a w2_b)``.

``s = alpha / r`` everywhere; a LoKr layer with no decomposed factor has no r in LyCORIS's readers (they scale it
by 1), so value.py keeps such a layer's scale folded into ``lokr_w1`` with ``alpha = r = max(lokr_w2.shape)``.
"""
from __future__ import annotations

import torch


def lora_rank(p: dict) -> int:
    return p["lora_A.weight"].shape[0]


def loha_rank(p: dict) -> int:
    return p["hada_w1_b"].shape[0]


def lokr_rank(p: dict) -> int:
    """The rank of the decomposed factor; with none, ``max(lokr_w2.shape)``, the smallest rank at which peft keeps
    ``lokr_w2`` whole (it decomposes when ``r < max(shape) / 2``)."""
    for f in ("lokr_w2_b", "lokr_w1_b"):
        if f in p:
            return p[f].shape[0]
    return max(p["lokr_w2"].shape)


def lokr_factors(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Kronecker factors, each whole."""
    w1 = p["lokr_w1"].float() if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
    w2 = p["lokr_w2"].float() if "lokr_w2" in p else p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
    return w1, w2


def io_shape(p: dict) -> tuple[int, int]:
    """(out, in) of the layer the tensors adapt."""
    if "lora_A.weight" in p:
        return p["lora_B.weight"].shape[0], p["lora_A.weight"].shape[1]
    if "hada_w1_a" in p:
        return p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1]
    w1, w2 = lokr_factors(p)
    return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]


def lora_delta(p: dict, scale: float) -> torch.Tensor:
    """``scale * B A`` in fp32, shaped like the base weight (linear or conv)."""
    a, b = p["lora_A.weight"].float(), p["lora_B.weight"].float()
    d = scale * (b.flatten(1) @ a.flatten(1))
    return d.reshape(b.shape[0], *a.shape[1:]) if a.dim() == 4 else d


def lokr_delta(p: dict, scale: float) -> torch.Tensor:
    w1, w2 = lokr_factors(p)
    return scale * torch.kron(w1, w2)


def loha_delta(p: dict, scale: float) -> torch.Tensor:
    f = {k: v.float() for k, v in p.items()}
    return scale * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])


def dora_weight(p: dict, scale: float, weight: torch.Tensor) -> torch.Tensor:
    """The DoRA-adapted weight: magnitude times the direction ``W + s B A`` normed over each output row."""
    new = weight.float() + lora_delta(p, scale)
    return p["lora_magnitude_vector"].float().reshape(-1, 1) * new / new.norm(dim=1, keepdim=True)
