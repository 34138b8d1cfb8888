"""NoiseSchedule against diffusers' DDPMScheduler and the min-SNR paper's weights."""
import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_pl.bases import SCHEDULER
from dreambooth_pl.noise import NoiseSchedule


def _pair(prediction_type: str):
    cfg = dict(SCHEDULER, prediction_type=prediction_type)
    return NoiseSchedule(cfg), DDPMScheduler.from_config(cfg)


def _batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    return x0, noise, torch.tensor([0, 1, 500, 999])


def test_add_noise_matches_ddpm_scheduler():
    ours, ref = _pair("epsilon")
    x0, noise, t = _batch()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.target(x0, noise, t), noise)


def test_v_prediction_target_matches_ddpm_velocity():
    ours, ref = _pair("v_prediction")
    x0, noise, t = _batch()
    torch.testing.assert_close(ours.target(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_hang_et_al(prediction_type):
    ours, ref = _pair(prediction_type)
    t = torch.tensor([0, 10, 100, 500, 999])
    a = ref.alphas_cumprod[t]
    snr = a / (1 - a)
    torch.testing.assert_close(ours.snr(t), snr)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    torch.testing.assert_close(ours.min_snr_weights(t, 5.0), expected)
    if prediction_type == "epsilon":  # noisy steps (SNR < gamma) keep weight 1, clean ones are down-weighted
        assert ours.min_snr_weights(t, 5.0)[-1].item() == pytest.approx(1.0)
        assert ours.min_snr_weights(t, 5.0)[0].item() < 0.01


def test_timesteps_are_seeded_and_in_range():
    ours, _ = _pair("epsilon")
    t1 = ours.sample_timesteps(1000, torch.Generator().manual_seed(3))
    t2 = ours.sample_timesteps(1000, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.min() >= 0 and t1.max() < 1000 and t1.dtype == torch.int64
    assert len(t1.unique()) > 500


def test_unsupported_prediction_type_is_refused():
    with pytest.raises(ValueError, match="'sample' is not supported"):
        NoiseSchedule(dict(SCHEDULER, prediction_type="sample"))
