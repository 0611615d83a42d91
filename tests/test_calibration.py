"""fastguide.calibration: binned ECE and integral ECE on cases whose answers are known."""

import math

import pytest
import torch

import fastguide
from fastguide.calibration import binned_ece, ece_per_timestep, integral_ece
from fastguide.examples.mixture import GaussianMixture


def _logits_with_confidence(conf: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits whose softmax puts ``conf`` on ``predicted`` and spreads the rest evenly."""
    rest = (1 - conf) / (classes - 1)
    probs = rest[:, None].expand(-1, classes).clone()
    probs[torch.arange(len(conf)), predicted] = conf
    return probs.log()


def test_binned_ece_perfectly_calibrated_bins_is_zero():
    # Bin of confidence 0.75 with 3/4 correct and a bin of 0.5 with 1/2 correct: calibrated, ECE = 0.
    conf = torch.tensor([0.75] * 4 + [0.5] * 2, dtype=torch.float64)
    pred = torch.zeros(6, dtype=torch.long)
    labels = torch.tensor([0, 0, 0, 1, 0, 1])
    assert binned_ece(_logits_with_confidence(conf, pred, 3), labels) == pytest.approx(0.0, abs=1e-12)


def test_binned_ece_overconfident_known_value():
    # Confidence 0.9 everywhere, accuracy 0.6: ECE = |0.6 - 0.9| = 0.3.
    conf = torch.full((10,), 0.9, dtype=torch.float64)
    pred = torch.zeros(10, dtype=torch.long)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert binned_ece(_logits_with_confidence(conf, pred, 10), labels) == pytest.approx(0.3, abs=1e-12)


def test_binned_ece_weights_bins_by_their_size():
    # Two bins: 8 samples at conf 0.95 all right (gap 0.05), 2 samples at conf 0.35 all wrong (gap 0.35).
    conf = torch.tensor([0.95] * 8 + [0.35] * 2, dtype=torch.float64)
    pred = torch.zeros(10, dtype=torch.long)
    labels = torch.tensor([0] * 8 + [1] * 2)
    expected = 0.8 * 0.05 + 0.2 * 0.35
    assert binned_ece(_logits_with_confidence(conf, pred, 4), labels) == pytest.approx(expected, abs=1e-12)


def test_binned_ece_one_bin_is_the_global_gap_and_edges_go_down():
    conf = torch.tensor([0.6, 0.8], dtype=torch.float64)
    logits = _logits_with_confidence(conf, torch.zeros(2, dtype=torch.long), 3)
    labels = torch.tensor([0, 1])
    assert binned_ece(logits, labels, bins=1) == pytest.approx(abs(0.5 - 0.7), abs=1e-12)
    # With 5 bins, 0.6 sits on the edge of bin (0.4, 0.6] and 0.8 on (0.6, 0.8]: separate bins.
    assert binned_ece(logits, labels, bins=5) == pytest.approx(0.5 * 0.4 + 0.5 * 0.8, abs=1e-12)


def test_binned_ece_bad_input():
    with pytest.raises(ValueError, match="bins"):
        binned_ece(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), bins=0)
    with pytest.raises(ValueError, match="logits"):
        binned_ece(torch.zeros(6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        binned_ece(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def _mixture_data(n: int, seed: int = 0):
    mix = GaussianMixture.ring(classes=4, var=0.25)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x0 = mix.means[y].float() + mix.var ** 0.5 * torch.randn(n, 2, generator=g)
    return mix, x0.reshape(n, 2, 1, 1), y


def test_integral_ece_exact_noisy_posterior_is_calibrated_and_sharpened_one_is_not():
    """The exact class posterior of a Gaussian mixture under the forward process is calibrated at every t
    (ECE ~ 0 up to sampling noise); the same logits times 4 are overconfident wherever classes overlap."""
    schedule = fastguide.Schedule.ddpm()
    mix, x0, y = _mixture_data(20000)
    exact = mix.noisy_classifier(schedule)
    ts = [50, 300, 500, 700]
    g = torch.Generator().manual_seed(1)
    calibrated = ece_per_timestep(exact, x0, y, schedule=schedule, timesteps=ts, generator=g)
    # Sampling noise of a 15-bin ECE with n = 20000 is ~0.01; a miscalibration of 0.05 would fail.
    assert calibrated.max().item() < 0.02
    g = torch.Generator().manual_seed(1)
    sharp = ece_per_timestep(lambda x, t: 4 * exact(x, t), x0, y, schedule=schedule, timesteps=ts, generator=g)
    # Where the noised classes overlap (t = 300..700 here) 4x logits overclaim by 0.15-0.3; at t = 50 the
    # classes are separated (confidence ~1 either way), so both are calibrated there.
    assert (sharp[1:] > 0.1).all() and sharp[0] < 0.02, sharp
    assert integral_ece(lambda x, t: 4 * exact(x, t), x0, y, schedule=schedule, timesteps=ts,
                        generator=torch.Generator().manual_seed(1)) == pytest.approx(sharp.mean().item())


def test_integral_ece_is_the_mean_over_timesteps_of_a_time_dependent_classifier():
    # Ignores x; confidence 0.9 on class 0 for t < 500, 0.6 after. Labels half 0 / half 1 -> acc 0.5.
    schedule = fastguide.Schedule.ddpm()
    y = torch.tensor([0, 1] * 50)
    x0 = torch.zeros(100, 1, 2, 2)

    def clf(x, t):
        conf = torch.where(t < 500, torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64))
        return _logits_with_confidence(conf, torch.zeros(len(t), dtype=torch.long), 2)

    ts = [10, 100, 600, 999]
    per_t = ece_per_timestep(clf, x0, y, schedule=schedule, timesteps=ts)
    assert per_t.tolist() == pytest.approx([0.4, 0.4, 0.1, 0.1], abs=1e-9)
    assert integral_ece(clf, x0, y, schedule=schedule, timesteps=ts) == pytest.approx(0.25, abs=1e-9)


def test_integral_ece_x0_input_sees_the_denoisers_prediction():
    """With an oracle eps-denoiser x0^ equals the clean x0 at every t, so the x0-input ECE of a classifier
    is its clean-data ECE at every timestep; on x_t the same classifier degrades with t."""
    schedule = fastguide.Schedule.ddpm()
    mix, x0, y = _mixture_data(4000)
    clean_posterior = mix.noisy_classifier(schedule)
    at_t0 = lambda x, t: clean_posterior(x, torch.zeros_like(t))  # the clean-data posterior, t ignored
    seen = []

    def oracle(x_t, t):
        a = torch.from_numpy(schedule.alphas_cumprod)[t.long()].float().sqrt().reshape(-1, 1, 1, 1)
        seen.append(t[0].item())
        return (x_t - a * x0) / (1 - a * a).sqrt()

    ts = [100, 500, 900]
    clean_ece = binned_ece(at_t0(x0, torch.zeros(len(y))), y)
    via_x0 = ece_per_timestep(at_t0, x0, y, schedule=schedule, timesteps=ts, input="x0", denoiser=oracle,
                              clip=None)
    assert seen == ts
    assert via_x0.tolist() == pytest.approx([clean_ece] * 3, abs=1e-4)
    via_xt = ece_per_timestep(at_t0, x0, y, schedule=schedule, timesteps=ts)
    assert via_xt[-1] > via_x0[-1] + 0.1


def test_integral_ece_bad_input():
    schedule = fastguide.Schedule.ddpm()
    x0, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    clf = lambda x, t: torch.zeros(len(x), 3)
    with pytest.raises(ValueError, match="denoiser"):
        integral_ece(clf, x0, y, schedule=schedule, timesteps=[1], input="x0")
    with pytest.raises(ValueError, match="input"):
        integral_ece(clf, x0, y, schedule=schedule, timesteps=[1], input="x1")
    with pytest.raises(ValueError, match="timesteps"):
        integral_ece(clf, x0, y, schedule=schedule, timesteps=[1000])
    with pytest.raises(ValueError, match="timesteps"):
        integral_ece(clf, x0, y, schedule=schedule, timesteps=[])
    with pytest.raises(ValueError, match="VP"):
        integral_ece(clf, x0, y, schedule=fastguide.Schedule.edm(), timesteps=[1])
    assert math.isfinite(integral_ece(clf, x0, y, schedule=schedule, timesteps=[0, 999]))
