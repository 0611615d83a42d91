"""Guidance specs: what the user asks for, checked when the spec is made.

Three methods compose in any combination:

* ``CFG`` — classifier-free guidance (Ho & Salimans 2022): the model runs once on the 2B batch.
  ``CFGPlusPlus`` (Chung et al. 2024) takes its place on Euler samplers, and so do the methods of
  ``fastguide.guidance.modern`` (CFG-Zero*, APG, MAMBO-G, TCFG, perturbed-branch guidance): at most one of
  these CFG-like specs per loop.
* ``ClassifierGuidance`` — ``input="xt"``: ADM (Dhariwal & Nichol 2021), a noisy classifier on x_t;
  ``input="x0"``: Ma et al. 2023, an off-the-shelf classifier on the predicted x0^ with the temperature
  objective ``tau1 l_y - logsumexp(tau2 l)``, and on sigma samplers their EDM recipe.
* ``DiscriminatorGuidance`` — Kim et al. 2022: ``score += w grad_x log(d / (1 - d))``.

A gradient enters a step either as a *score correction* (``eps -= sigma g``; ADM-DDIM, DG) or as a
*mean shift* (``mu += Sigma g``; ADM-DDPM, Ma et al. DDPM, DG-DDPM), see ``fastguide.core.layout``; the
gradients themselves are in ``fastguide.guidance.gradients``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from ..core.checks import check_fraction, check_nonneg, check_real, check_spec_scale_tensor, check_window


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance ``eps~ = u + scale (c - u)``, optionally rescaled (Lin et al. 2023), for
    ``fastguide.sample`` (``fastguide.step`` takes the same as ``guidance_scale=`` / ``guidance_rescale=``).

    Args:
        scale: float >= 0 or a ``[B]`` floating-point tensor (per-sample scales for mixed batches): w in
            ``u + w (c - u)``, applied to the model's prediction (eps, v or x0); 1 is the conditional model
            alone, 0 the unconditional one.
        rescale: float in [0, 1], default 0: diffusers' ``guidance_rescale`` phi (Lin et al. 2023: the guided
            output's per-sample std is pulled towards the cond output's; 0.7 in the paper).
        null_label: default None. The label the uncond half gets: a number (``torch.full_like(y, null_label)``)
            or a tensor broadcastable to ``y`` (e.g. the null class 1000 of an ImageNet DiT); the model then
            runs once on the 2B batch ``[x; x]`` with labels ``[null; y]``. None: the uncond half is a
            second call ``model(x, t, None)``.
        start: float in [0, 1], default 0, and
        stop: float in [start, 1], default 1: the guidance window ``start <= i / steps < stop`` over the
            sampling steps i = 0 .. steps-1 (Kynkäänniemi et al. 2024); outside it only the cond half is
            evaluated (one model call on B rows).

    Every argument is checked when the spec is made (``ValueError``/``TypeError`` naming it).

    >>> fastguide.sample(model, x_T, schedule=s, sampler="ddim", steps=50, y=y,
    ...                  guidance=[fastguide.CFG(4.0, null_label=10)])
    """

    scale: Union[float, torch.Tensor]
    rescale: float = 0.0
    null_label: Any = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        if isinstance(self.scale, torch.Tensor):
            check_spec_scale_tensor("CFG scale", self.scale)
        else:
            check_nonneg("CFG scale", self.scale)
        check_fraction("CFG rescale", self.rescale)
        check_window("CFG start", self.start, "CFG stop", self.stop)

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.stop


@dataclass(frozen=True)
class CFGPlusPlus:
    """CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models")
    for ``fastguide.sample`` with ``sampler="euler"`` or ``"euler_ancestral"``: the step's x0^ comes from the
    guided prediction ``u + scale (c - u)`` while the renoising direction is the unconditional eps(u):

        x_next = x0^(u + lambda (c - u)) + sigma_next eps(u)        (+ sigma_up z for euler_ancestral,
                                                                        stepping to sigma_down)

    which is ComfyUI's ``sample_euler_cfg_pp`` / ``sample_euler_ancestral_cfg_pp`` (``x = denoised + d
    sigma_next`` with ``d = to_d(x, sigma, uncond_denoised)``). On a flow schedule ``euler`` renoises alike,
    ``x_next = (1 - s_next) x0^ + s_next eps(u)``.

    Args:
        scale: float in [0, 1] or a ``[B]`` floating-point tensor of such values: the paper's lambda. It
            multiplies ``c - u`` exactly as a CFG scale does (in eps, v or x0 space alike, all linear in the
            prediction), and it is also ComfyUI's ``cfg`` value for its CFG++ samplers
            (``denoised = uncond + cfg (cond - uncond)``); lambda = 1 is the conditional model's x0^ renoised
            with the unconditional eps. The paper reports lambda around 0.2 - 0.8 where CFG would use 2 - 12.
        null_label: default None, as ``CFG``'s: the uncond half's label (one 2B call), or None (a second
            call ``model(x, t, None)``).
        start: float in [0, 1], default 0, and
        stop: float in [start, 1], default 1: the guidance window over the sampling steps, as ``CFG``'s;
            outside it the step is a plain Euler step of the conditional model.

    Every argument is checked when the spec is made; another sampler is refused by ``fastguide.sample``
    (``ValueError`` naming ``sampler``).

    >>> fastguide.sample(model, x_T, schedule=s, sampler="euler", steps=30, y=y,
    ...                  guidance=[fastguide.CFGPlusPlus(0.6, null_label=10)])
    """

    scale: Union[float, torch.Tensor]
    null_label: Any = None
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        if isinstance(self.scale, torch.Tensor):
            check_lambda("CFGPlusPlus scale", check_spec_scale_tensor("CFGPlusPlus scale", self.scale))
        else:
            check_fraction("CFGPlusPlus scale", self.scale)
        check_window("CFGPlusPlus start", self.start, "CFGPlusPlus stop", self.stop)

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.stop


def check_lambda(name: str, scale: torch.Tensor) -> None:
    """A CFG++ scale tensor's values lie in [0, 1] (read on the CPU only: a device tensor would sync here;
    ``fastguide.sample`` checks it once, up front, on any device)."""
    if scale.device.type == "cpu" and scale.numel() and not bool(((scale >= 0) & (scale <= 1)).all()):
        raise ValueError(f"{name} (CFG++'s lambda) must lie in [0, 1], got {scale.tolist()}")


@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance with ``classifier(x, t) -> logits [B, K]`` towards the labels ``y`` (passed to
    ``fastguide.sample(..., y=...)`` / ``fastguide.step(..., y=...)`` as a ``[B]`` integer tensor).

    ``input="xt"`` (ADM): the classifier sees the noisy state (its VP view and timestep); DDPM shifts the
    mean by ``scale * Sigma * g`` (guided-diffusion ``condition_mean``), the other samplers correct the
    score (``condition_score``); on Heun only the first (Euler) stage is guided. Objective
    ``tau1 l_y - logsumexp(tau2 l)``; tau1 = tau2 = 1 is log-softmax.

    ``input="x0"`` (Ma et al. 2023): on DDPM/DDIM the classifier sees the predicted x0^ (clipped when the
    loop clips) and ``g = scale * grad_{x0^} J`` shifts the mean by
    ``(Sigma_t + max(0, gamma * Sigma_max * sin(pi i / N))) g`` with i = N-1 .. 0 the step counted down
    (EluCD) — DDIM has no model variance, so Sigma_t is the DDPM posterior variance of the step pair.
    On sigma samplers it follows their EDM recipe: the classifier sees ``x / max(1, rms(x))``, and
    ``g / rms(g) * rms(x) * w_i * scale`` with ``w_i = max(g_max/(N+1) (N+1-i), 1e-5) + sin(pi i/N) g_max add``
    is added to the state before the denoiser (the Heun correction is unguided). ``fastguide.step`` has
    ``input="x0"`` for DDPMScheduler only.
    ImageNet-128 defaults of the paper: scale=1, tau1=1, tau2=0.5, gamma=0.3 with ``smooth(clf, 3.0)``;
    EDM: tau1=1, tau2=0, g_max=0.004, add=0.3 with ``smooth(clf, 5.0)``.

    Args:
        classifier: callable ``classifier(x, t) -> logits`` of shape ``[B, K]``. ``x`` has the sample's shape
            (the VP view ``x_t`` for ``"xt"``, x0^ or the rms-normalised state for ``"x0"``); ``t`` is a
            ``[B]`` float32 tensor: the training timestep on VP schedules (and in ``fastguide.step``), the VP
            time tau(sigma) in [0, 1] (beta_min = 0.1, beta_max = 20) on EDM schedules. Any other output
            shape is a ``ValueError`` naming the classifier and the expected shape.
        scale: float >= 0, default 1.0: the guidance scale s multiplying ``grad J``.
        input: ``"xt"`` (default; ADM, a noise-aware classifier) or ``"x0"`` (Ma et al., an off-the-shelf one).
        tau1: finite float, default 1.0: the target logit's weight in J.
        tau2: finite float, default 1.0: the logsumexp temperature in J.
        gamma: float >= 0, default 0: Ma et al.'s extra-variance factor (``input="x0"`` on DDPM/DDIM).
        g_max: float >= 0, default 0.004: the EDM recipe's peak weight (``input="x0"`` on sigma samplers).
        add: float >= 0, default 0.3: the EDM recipe's sine bump, relative to ``g_max``.

    Every argument is checked when the spec is made (``ValueError``/``TypeError`` naming it).

    >>> clf = lambda x, t: x.flatten(1)[:, :10]            # any classifier(x, t) -> logits [B, 10]
    >>> adm = fastguide.ClassifierGuidance(clf, scale=2.0)                   # ADM on x_t
    >>> x = fastguide.sample(model, torch.randn(4, 3, 8, 8), schedule=fastguide.Schedule.ddpm(),
    ...                      sampler="ddpm", steps=25, y=torch.tensor([0, 1, 2, 3]), guidance=[adm])
    >>> ma = fastguide.ClassifierGuidance(clf, input="x0", tau1=1.0, tau2=0.5, gamma=0.3)  # Ma et al.
    """

    classifier: Callable[..., torch.Tensor]
    scale: float = 1.0
    input: str = "xt"
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 0.0
    g_max: float = 0.004
    add: float = 0.3

    def __post_init__(self):
        if not callable(self.classifier):
            raise TypeError("classifier must be callable as classifier(x, t) -> logits [B, K]")
        if self.input not in ("xt", "x0"):
            raise ValueError(f"ClassifierGuidance input must be 'xt' or 'x0', got {self.input!r}")
        for name in ("scale", "gamma", "g_max", "add"):
            check_nonneg(f"ClassifierGuidance {name}", getattr(self, name))
        for name in ("tau1", "tau2"):
            check_real(f"ClassifierGuidance {name}", getattr(self, name))


@dataclass(frozen=True)
class DiscriminatorGuidance:
    """Discriminator guidance (Kim et al. 2022) with ``discriminator(x, t, y) -> logit [B]``.

    Adds ``weight * grad_x log(d / (1 - d))`` (d clipped to [1e-5, 1 - 1e-5]) to the score: on Heun
    ``D' = D + weight sigma^2 c`` in the first stage and ``weight2`` in the second; on DDPM a mean shift
    ``Sigma * weight * c``; on other samplers a score correction. Only where the VP time (t/T for VP
    schedules, tau(sigma) with beta0=0.1, beta1=20 for EDM) lies in ``[t_min, t_max]``. The
    discriminator sees the VP view of the state (x / sqrt(1 + sigma^2) for EDM) and the VP time tau for
    EDM schedules, the training timestep for VP schedules. Papers' recipes: EDM ``weight=2`` (uncond) or
    1 (cond), ``t_min=0.01``; DiT/ADM DDPM ``t_min=0.101`` (t > 100 of 1000).

    Args:
        discriminator: callable ``discriminator(x, t, y) -> logit`` of shape ``[B]``: the pre-sigmoid logit of
            d = P(real | x). ``x`` has the sample's shape (the VP view of the state); ``t`` is a ``[B]``
            float32 tensor (training timestep on VP schedules and in ``fastguide.step``, VP time tau on EDM);
            ``y`` the labels or None. Any other output shape is a ``ValueError`` naming the discriminator and
            the expected shape.
        weight: float >= 0, default 1.0: w, the guidance weight (every guided stage; Heun's first stage).
        weight2: float >= 0, default 0.0: the weight in Heun's correction stage (0: the correction is
            unguided).
        t_min: float in [0, 1], default 0.0, and
        t_max: float in [t_min, 1], default 1.0: the window of VP time (t / T on VP schedules,
            tau(sigma) on EDM) in which the discriminator guides; outside it it is not called.

    Every argument is checked when the spec is made (``ValueError``/``TypeError`` naming it).

    >>> disc = lambda x, t, y: x.flatten(1).mean(1)        # any discriminator(x, t, y) -> logit [B]
    >>> dg = fastguide.DiscriminatorGuidance(disc, weight=2.0, t_min=0.01)
    >>> x = fastguide.sample(denoiser, torch.randn(4, 3, 8, 8), schedule=fastguide.Schedule.edm(),
    ...                      sampler="heun", steps=18, guidance=[dg])
    """

    discriminator: Callable[..., torch.Tensor]
    weight: float = 1.0
    weight2: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        if not callable(self.discriminator):
            raise TypeError("discriminator must be callable as discriminator(x, t, y) -> logit [B]")
        check_nonneg("DiscriminatorGuidance weight", self.weight)
        check_nonneg("DiscriminatorGuidance weight2", self.weight2)
        check_window("DiscriminatorGuidance t_min", self.t_min, "DiscriminatorGuidance t_max", self.t_max)

    def weight_at(self, vp_time: float, second_stage: bool = False) -> float:
        """The weight at VP time ``vp_time`` (0 outside ``[t_min, t_max]``); ``second_stage``: Heun's
        correction stage, which takes ``weight2``."""
        if not self.t_min <= vp_time <= self.t_max:
            return 0.0
        return self.weight2 if second_stage else self.weight


def smooth(classifier: nn.Module, beta: float) -> nn.Module:
    """A copy of ``classifier`` with every ``nn.ReLU`` module replaced by ``nn.Softplus(beta)`` (Ma et al.):
    smooth activations give the classifier-guidance gradients of an off-the-shelf ReLU network.

    Args:
        classifier: an ``nn.Module``; it is deep-copied (weights included) and left unchanged.
        beta: finite float > 0: the Softplus sharpness, ``softplus(x) = log(1 + exp(beta x)) / beta``
            (ReLU as beta -> inf); Ma et al. use 3.0 (ImageNet-128 DDPM) and 5.0 (EDM).

    Returns the smoothed copy. Functional ``F.relu`` calls inside ``forward`` cannot be found this way and stay
    ReLU.

    >>> guided_clf = fastguide.smooth(resnet, beta=3.0)
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    if check_nonneg("beta", beta) == 0:
        raise ValueError("beta must be > 0")
    smoothed = copy.deepcopy(classifier)
    _replace_relus(smoothed, float(beta))
    return smoothed


def _replace_relus(module: nn.Module, beta: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
        else:
            _replace_relus(child, beta)


