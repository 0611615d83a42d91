"""fastguide.training: the losses on cases with known answers, and a few-iteration smoke of each digits
training loop."""

import math
import os

import pytest
import torch
from torch import nn

import fastguide
from fastguide import training

SCHEDULE = fastguide.Schedule.ddpm()


def _alpha_sigma(t: torch.Tensor):
    abar = torch.from_numpy(SCHEDULE.alphas_cumprod)[t.long()].float().reshape(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def test_q_sample_is_the_closed_form_forward_process():
    x0, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 1, 250, 998, 999])
    a, s = _alpha_sigma(t)
    torch.testing.assert_close(training.q_sample(SCHEDULE, x0, t, noise), a * x0 + s * noise)
    with pytest.raises(ValueError, match="t must lie"):
        training.q_sample(SCHEDULE, x0, torch.tensor([0, 1, 2, 3, 1000]), noise)
    with pytest.raises(ValueError, match="noise"):
        training.q_sample(SCHEDULE, x0, t, noise[:, :, :2])
    with pytest.raises(ValueError, match="VP"):
        training.q_sample(fastguide.Schedule.edm(), x0, t, noise)


def test_sample_timesteps_cover_all_training_steps_uniformly():
    t = training.sample_timesteps(200_000, SCHEDULE, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 999
    counts = torch.bincount(t, minlength=1000).double()
    # 200 expected per value; a uniform draw keeps the 10 deciles within 2% of each other.
    deciles = counts.reshape(10, 100).sum(1) / 20_000
    assert (deciles - 1).abs().max() < 0.03


def test_drop_labels_rate_and_extremes():
    y = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(training.drop_labels(y, 0.0, 10), y)
    assert (training.drop_labels(y, 1.0, 10) == 10).all()
    dropped = training.drop_labels(y, 0.2, 10, torch.Generator().manual_seed(1))
    rate = (dropped == 10).double().mean().item()
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(y))  # 4 binomial standard errors
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])  # labels are dropped, never changed
    with pytest.raises(ValueError, match="p_uncond"):
        training.drop_labels(y, 1.5, 10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_of_an_oracle_is_zero_and_of_a_zero_model_is_the_target_power(prediction_type):
    schedule = fastguide.Schedule.ddpm(prediction_type=prediction_type)
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def oracle(x_t, t, y):
        # Knows x0 (closure), so it can invert the forward process for the noise and form any target.
        a, s = _alpha_sigma(t)
        eps = (x_t - a * x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]

    loss = training.diffusion_loss(oracle, x0, None, schedule, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    zero = training.diffusion_loss(lambda x, t, y: torch.zeros_like(x), x0, None, schedule,
                                   generator=torch.Generator().manual_seed(1))
    if prediction_type == "sample":
        assert zero.item() == pytest.approx(x0.square().mean().item(), rel=1e-6)
    else:  # eps ~ N(0, 1); v = a eps - s x0 with a^2 + s^2 = 1 and unit-variance x0: power ~1
        assert 0.8 < zero.item() < 1.2


def test_diffusion_loss_applies_cfg_dropout_and_timesteps():
    seen = {}

    def recorder(x_t, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x_t)

    x0, y = torch.zeros(20_000, 1, 1, 1), torch.randint(0, 10, (20_000,))
    training.diffusion_loss(recorder, x0, y, SCHEDULE, p_uncond=0.1, null_label=10,
                            generator=torch.Generator().manual_seed(0))
    rate = (seen["y"] == 10).double().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20_000)
    assert torch.equal(seen["y"][seen["y"] != 10], y[seen["y"] != 10])
    assert seen["t"].dtype == torch.float32 and seen["t"].min() >= 0 and seen["t"].max() <= 999
    training.diffusion_loss(recorder, x0, y, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["y"], y)  # p_uncond = 0: labels pass untouched
    with pytest.raises(ValueError, match="null_label"):
        training.diffusion_loss(recorder, x0, y, SCHEDULE, p_uncond=0.1)


def test_noisy_classifier_loss_known_values_and_inputs():
    x0, y = torch.randn(4000, 1, 2, 2), torch.randint(0, 5, (4000,))
    seen = {}

    def uniform(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros(len(x_t), 5)

    loss = training.noisy_classifier_loss(uniform, x0, y, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)
    t = seen["t"]
    assert t.min() < 20 and t.max() > 980  # t uniform over all 1000 training steps
    a, s = _alpha_sigma(t)
    noise = (seen["x_t"] - a * x0) / s  # x_t is a forward-process draw: the implied noise is standard normal
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    oracle = lambda x_t, t: 50.0 * nn.functional.one_hot(y, 5).float()
    assert training.noisy_classifier_loss(oracle, x0, y, SCHEDULE).item() < 1e-6


def test_discriminator_loss_targets_labels_and_time_window():
    real, fake = torch.randn(300, 1, 2, 2), torch.randn(200, 1, 2, 2)
    seen = {}

    def disc(x_t, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros(len(x_t))

    assert training.discriminator_loss(disc, real, fake, SCHEDULE).item() == pytest.approx(math.log(2), rel=1e-6)
    assert seen["y"] is None
    y_real, y_fake = torch.randint(0, 10, (300,)), torch.randint(0, 10, (200,))
    training.discriminator_loss(disc, real, fake, SCHEDULE, y_real=y_real, y_fake=y_fake, t_min=600)
    assert torch.equal(seen["y"], torch.cat([y_real, y_fake])) and seen["t"].min() >= 600

    # Real rows come first: a discriminator that says "real" (logit +20) exactly on them has loss ~0, the
    # reverse pays 20 nats per sample.
    right = lambda x_t, t, y: torch.cat([torch.full((300,), 20.0), torch.full((200,), -20.0)])
    assert training.discriminator_loss(right, real, fake, SCHEDULE).item() < 1e-8
    wrong = lambda x_t, t, y: -right(x_t, t, y)
    assert training.discriminator_loss(wrong, real, fake, SCHEDULE).item() == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        training.discriminator_loss(disc, real, fake, SCHEDULE, y_real=y_real)
    with pytest.raises(ValueError, match="logit"):
        training.discriminator_loss(lambda x, t, y: torch.zeros(len(x), 1), real, fake, SCHEDULE)


def test_ema_update():
    avg, cur = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in avg.parameters()]
    training.ema_update(avg, cur, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(avg.parameters(), before))
    training.ema_update(avg, cur, 0.75)
    for a, b, c in zip(avg.parameters(), before, cur.parameters()):
        torch.testing.assert_close(a, 0.75 * b + 0.25 * c)
    training.ema_update(avg, cur, 0.0)
    assert all(torch.equal(a, c) for a, c in zip(avg.parameters(), cur.parameters()))


# ---- the digits training loops: a few iterations each -------------------------------------------------

def _changed(net: nn.Module, fresh: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))


def test_digits_training_loops_run_and_learn(tmp_path, one_thread):
    from fastguide.examples import digits
    from fastguide.examples.digits import config, models, train

    x, y = digits.load_train()
    x, y = x[:64], y[:64]
    schedule = config.make_schedule()
    unet = train.train_denoiser(x, y, schedule, steps=3, batch_size=8, seed=0)
    torch.manual_seed(0)
    assert isinstance(unet, models.UNet) and _changed(unet, models.UNet())
    noisy = train.train_noisy_classifier(x, y, schedule, steps=3, batch_size=8)
    assert isinstance(noisy, models.NoisyClassifier)
    fake = train.generate(unet, torch.arange(10), schedule, seed=0)
    assert fake.shape == (10, 1, 8, 8) and torch.isfinite(fake).all() and fake.abs().max() <= 1 + 1e-5
    disc = train.train_discriminator(x, y, fake, torch.arange(10), schedule, steps=3, batch_size=8)
    assert disc(x[:4], torch.full((4,), 10.0), y[:4]).shape == (4,)

    # The clean classifier is cheap enough to check that its loop actually learns: 60 steps on 64 digits
    # take it from chance to fitting most of them.
    clean = train.train_clean_classifier(x, y, steps=60, batch_size=32, lr=3e-3)
    with torch.no_grad():
        acc = (clean(x).argmax(1) == y).double().mean().item()
    assert acc > 0.5

    # train_all writes the four files that digits.load reads back.
    cfg = train.TrainConfig(denoiser_steps=2, noisy_classifier_steps=2, clean_classifier_steps=2,
                            discriminator_steps=2, generated_per_class=1, batch_size=8)
    paths = train.train_all(str(tmp_path), cfg, log=None)
    assert sorted(os.path.basename(p) for p in paths.values()) == sorted(train.WEIGHT_FILES.values())
    bundle = digits.load(str(tmp_path))
    out = bundle.model(torch.zeros(2, 1, 8, 8), torch.tensor([5.0, 900.0]), torch.tensor([3, digits.NULL_LABEL]))
    assert out.shape == (2, 1, 8, 8)
