"""Training losses for the networks guidance needs: a CFG-ready denoiser, an ADM noisy classifier and a
discriminator-guidance discriminator. Each is a plain function of (network, batch, schedule) returning a
scalar loss, so it fits any model and any training loop.

* ``diffusion_loss`` — the denoising loss with CFG label dropout (Ho & Salimans 2022): a fraction
  ``p_uncond`` of labels is replaced by the null label, so one network learns both the conditional and the
  unconditional model.
* ``noisy_classifier_loss`` — ADM's classifier loss (Dhariwal & Nichol 2021): t uniform over all training
  timesteps, x_t from the forward process, cross-entropy against the clean label.
* ``discriminator_loss`` — discriminator guidance's loss (Kim et al. 2022): binary cross-entropy with
  real = 1 and generated = 0, both noised at independent random t; the discriminator may see the labels.

All randomness comes from an optional ``torch.Generator``, so a seeded loop is reproducible.

>>> opt = torch.optim.Adam(unet.parameters(), 1e-3)
>>> loss = fastguide.training.diffusion_loss(unet, x0, y, schedule, p_uncond=0.1, null_label=10)
>>> opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .samplers.schedule import Schedule


def _vp(schedule: Schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastguide.Schedule, got {type(schedule).__name__}")
    if schedule.kind != "vp":
        raise ValueError("the training losses need a VP schedule (fastguide.Schedule.ddpm); got an EDM schedule")
    return schedule


def sample_timesteps(batch: int, schedule: Schedule, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """``batch`` training timesteps drawn uniformly from ``0 .. T-1`` (int64).

    >>> t = sample_timesteps(128, fastguide.Schedule.ddpm())      # values in [0, 1000)
    """
    T = _vp(schedule).num_train_timesteps
    return torch.randint(0, T, (batch,), generator=generator).to(device or "cpu")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def alpha_sigma(schedule: Schedule, t: torch.Tensor, like: torch.Tensor):
    """``(sqrt(alphā_t), sqrt(1 - alphā_t))`` at integer timesteps ``t``, shaped to broadcast over ``like``."""
    abar = torch.from_numpy(_vp(schedule).alphas_cumprod)[t.long().cpu()]
    return _per_sample(abar.sqrt(), like), _per_sample((1 - abar).sqrt(), like)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process ``x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) noise`` at integer timesteps ``t``.

    >>> x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    """
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [{x0.shape[0]}], got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    T = _vp(schedule).num_train_timesteps
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"t must lie in [0, {T}), got {t.tolist()}")
    a, s = alpha_sigma(schedule, t, x0)
    return a * x0 + s * noise


def drop_labels(y: torch.Tensor, p_uncond: float, null_label: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CFG label dropout: each label independently becomes ``null_label`` with probability ``p_uncond``.

    >>> y_train = drop_labels(y, 0.1, null_label=10)      # ~10% of rows now ask for "no class"
    """
    if isinstance(p_uncond, bool) or not isinstance(p_uncond, (int, float)) or not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond!r}")
    drop = torch.rand(y.shape, generator=generator).to(y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def diffusion_target(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a model of the schedule's ``prediction_type`` should output: eps, x0, or v = a eps - s x0."""
    kind = _vp(schedule).prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    a, s = alpha_sigma(schedule, t, x0)
    return a * noise - s * x0


def diffusion_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, y: Optional[torch.Tensor],
                   schedule: Schedule, *, p_uncond: float = 0.0, null_label: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Denoising loss ``mean |model(x_t, t, y') - target|^2`` with t uniform and CFG label dropout.

    ``y'`` is ``y`` with a fraction ``p_uncond`` replaced by ``null_label`` (needs ``null_label`` when
    ``p_uncond > 0``); the target follows the schedule's prediction type (Ho et al. 2020's simple loss).

    >>> loss = diffusion_loss(unet, x0, y, schedule, p_uncond=0.1, null_label=10, generator=g)
    """
    if p_uncond > 0 and (y is None or null_label is None):
        raise ValueError("CFG label dropout (p_uncond > 0) needs labels y and a null_label")
    t = sample_timesteps(x0.shape[0], schedule, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = q_sample(schedule, x0, t, noise)
    if y is not None and p_uncond > 0:
        y = drop_labels(y, p_uncond, null_label, generator)
    out = model(x_t, t.float(), y)
    return F.mse_loss(out, diffusion_target(schedule, x0, noise, t))


def noisy_classifier_loss(classifier: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
                          schedule: Schedule, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ADM's noisy-classifier loss: cross-entropy of ``classifier(x_t, t)`` against ``y``, t uniform over all
    training timesteps and ``x_t = q_sample(x0, t, eps)``.

    >>> loss = noisy_classifier_loss(noisy_clf, x0, y, schedule, generator=g)
    """
    t = sample_timesteps(x0.shape[0], schedule, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    logits = classifier(q_sample(schedule, x0, t, noise), t.float())
    return F.cross_entropy(logits, y)


def discriminator_loss(discriminator: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                       schedule: Schedule, *, y_real: Optional[torch.Tensor] = None,
                       y_fake: Optional[torch.Tensor] = None, t_min: int = 0,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Discriminator-guidance loss: BCE of ``discriminator(x_t, t, y) -> logit`` with real = 1, generated = 0.

    Real and generated clean samples are each noised at their own uniform t in ``[t_min, T)``; labels are
    passed when given (class-conditional discriminator), else ``y=None``. The loss is the mean over the
    concatenated batch.

    >>> loss = discriminator_loss(disc, real_x0, fake_x0, schedule, y_real=y, y_fake=y_gen, generator=g)
    """
    if (y_real is None) != (y_fake is None):
        raise ValueError("give labels for both the real and the generated batch, or for neither")
    T = _vp(schedule).num_train_timesteps
    if isinstance(t_min, bool) or not isinstance(t_min, int) or not 0 <= t_min < T:
        raise ValueError(f"t_min must be an int in [0, {T}), got {t_min!r}")
    x0 = torch.cat([real, fake])
    y = None if y_real is None else torch.cat([y_real, y_fake])
    t = torch.randint(t_min, T, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    logits = discriminator(q_sample(schedule, x0, t, noise), t.float(), y)
    if logits.shape != (x0.shape[0],):
        raise ValueError(f"discriminator must return a logit of shape [{x0.shape[0]}], got {tuple(logits.shape)}")
    target = torch.cat([torch.ones(real.shape[0]), torch.zeros(fake.shape[0])]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model``, parameter by parameter (buffers copied).

    >>> ema = copy.deepcopy(unet); ...; ema_update(ema, unet, 0.999)   # after each optimiser step
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    for avg, cur in zip(average.parameters(), model.parameters()):
        avg.lerp_(cur.detach(), 1.0 - decay)
    for avg, cur in zip(average.buffers(), model.buffers()):
        avg.copy_(cur)
