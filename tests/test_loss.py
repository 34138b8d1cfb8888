"""DreamBoothLoss: DreamBooth eq. 2 against hand-computed numbers, the prior weight, per-example weights."""
import pytest
import torch

from dreambooth_pl.loss import DreamBoothLoss

# Two instance rows then two prior rows, each a 2-element "latent": squared errors chosen by hand.
PRED = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, -1.0]]).view(4, 1, 1, 2)
TARGET = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(4, 1, 1, 2)
IS_PRIOR = torch.tensor([False, False, True, True])
# per-example MSE: (1+4)/2=2.5, (4+0)/2=2.0, (9+4)/2=6.5, (0+4)/2=2.0
INSTANCE, PRIOR = (2.5 + 2.0) / 2, (6.5 + 2.0) / 2


def test_loss_equals_hand_computation():
    out = DreamBoothLoss(prior_loss_weight=0.5)(PRED, TARGET, IS_PRIOR)
    assert out["loss_instance"].item() == pytest.approx(INSTANCE)
    assert out["loss_prior"].item() == pytest.approx(PRIOR)
    assert out["loss"].item() == pytest.approx(INSTANCE + 0.5 * PRIOR)


def test_rows_need_not_be_grouped():
    perm = torch.tensor([2, 0, 3, 1])
    out = DreamBoothLoss(1.0)(PRED[perm], TARGET[perm], IS_PRIOR[perm])
    assert out["loss"].item() == pytest.approx(INSTANCE + PRIOR)


def test_prior_weight_zero_equals_instance_only_loss():
    pred = PRED.clone().requires_grad_(True)
    mixed = DreamBoothLoss(0.0)(pred, TARGET, IS_PRIOR)
    alone = DreamBoothLoss(1.0)(PRED[:2], TARGET[:2], IS_PRIOR[:2])
    assert mixed["loss"].item() == alone["loss"].item() == pytest.approx(INSTANCE)
    assert mixed["loss_prior"].item() == pytest.approx(PRIOR)  # still reported
    mixed["loss"].backward()
    assert torch.count_nonzero(pred.grad[2:]) == 0 and torch.count_nonzero(pred.grad[:2]) > 0


def test_batch_without_priors_is_instance_only():
    out = DreamBoothLoss(1.0)(PRED[:2], TARGET[:2], IS_PRIOR[:2])
    assert out["loss_prior"].item() == 0.0
    assert out["loss"].item() == pytest.approx(INSTANCE)


def test_per_example_weights_apply_before_the_means():
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    out = DreamBoothLoss(1.0)(PRED, TARGET, IS_PRIOR, w)
    assert out["loss_instance"].item() == pytest.approx(2.5 / 2)
    assert out["loss_prior"].item() == pytest.approx((13.0 + 2.0) / 2)


def test_half_precision_inputs_reduce_in_fp32():
    out = DreamBoothLoss(1.0)(PRED.half(), TARGET.half(), IS_PRIOR)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(INSTANCE + PRIOR)


def test_negative_prior_weight_is_refused():
    with pytest.raises(ValueError, match="prior_loss_weight must be >= 0"):
        DreamBoothLoss(-0.1)


def test_masked_loss_equals_hand_computation_and_changes_the_gradient_only_where_the_mask_is_below_one():
    from dreambooth_pl.loss import latent_weights

    w = torch.tensor([[1.0, 0.25], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]).view(4, 1, 1, 2)  # priors: ones
    out = DreamBoothLoss(1.0)(PRED, TARGET, IS_PRIOR, pixel_weights=w)
    # instance rows: (1*1 + 0.25*4)/2 = 1.0 and (4 + 0)/2 = 2.0; priors unchanged
    assert out["loss_instance"].item() == pytest.approx((1.0 + 2.0) / 2)
    assert out["loss_prior"].item() == pytest.approx(PRIOR)
    grads = []
    for weights in (None, w):
        pred = PRED.clone().requires_grad_(True)
        DreamBoothLoss(1.0)(pred, TARGET, IS_PRIOR, pixel_weights=weights)["loss"].backward()
        grads.append(pred.grad)
    changed = grads[0] != grads[1]
    assert changed.view(4, 2).tolist() == [[False, True], [False, False], [False, False], [False, False]]
    torch.testing.assert_close(grads[1][0, 0, 0, 1], 0.25 * grads[0][0, 0, 0, 1])
    # pixel weights reach the latent grid as the mean of each 8x8 cell
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :8, :8] = 0.0
    mask[..., :4, 8:] = 0.5
    assert latent_weights(mask, (2, 2)).view(-1).tolist() == [0.0, 0.75, 1.0, 1.0]
