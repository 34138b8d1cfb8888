"""DreamBooth loss with prior preservation (Ruiz et al. 2023, arXiv 2208.12242, eq. 2), as named terms."""
from __future__ import annotations

import torch


class DreamBoothLoss(torch.nn.Module):
    """loss = MSE(instance) + prior_loss_weight * MSE(prior), each a mean over its own examples.

    Args:
        prior_loss_weight: lambda of eq. 2; 0 turns the prior term off (it is still reported).
    """

    def __init__(self, prior_loss_weight: float = 1.0):
        super().__init__()
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.prior_loss_weight = prior_loss_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, is_prior: torch.Tensor,
                weights: torch.Tensor | None = None,
                pixel_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms for a batch mixing instance and prior examples.

        Args:
            pred, target: ``[B, ...]`` model output and its target.
            is_prior: ``[B]`` bool, True for class-prior examples.
            weights: optional ``[B]`` per-example weights (e.g. min-SNR), applied before averaging.
            pixel_weights: optional ``[B, 1, h, w]`` loss-mask weights at the latent size (:func:`latent_weights`):
                each squared error is multiplied by its pixel's weight before the plain mean, so a weight of 1
                leaves that pixel's gradient as it was (kohya's masked loss).
        Returns:
            ``loss`` (to optimise), ``loss_instance``, ``loss_prior`` (0 when the batch has no prior example).
        """
        squared = (pred.float() - target.float()).pow(2)
        if pixel_weights is not None:
            squared = squared * pixel_weights.float()
        per_example = squared.flatten(1).mean(1)
        if weights is not None:
            per_example = per_example * weights.float()
        # masked means instead of boolean indexing: no host sync inside the training step; where() rather than
        # a 0/1 product, so a NaN in one term's examples does not leak into the other (NaN * 0 = NaN)
        prior = is_prior.to(per_example.dtype)
        inst = 1 - prior
        zero, mask = per_example.new_zeros(()), is_prior.bool()
        loss_instance = torch.where(mask, zero, per_example).sum() / inst.sum().clamp(min=1)
        loss_prior = torch.where(mask, per_example, zero).sum() / prior.sum().clamp(min=1)
        return {"loss": loss_instance + self.prior_loss_weight * loss_prior,
                "loss_instance": loss_instance, "loss_prior": loss_prior}


def latent_weights(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel loss weights ``[B, 1, H, W]`` averaged over each latent cell (``area``): ``[B, 1, h, w]``."""
    return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="area")
