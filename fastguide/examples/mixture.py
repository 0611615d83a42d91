"""A Gaussian mixture with exact diffusion models: every guidance method on known ground truth.

Data: K isotropic Gaussians ``N(mu_k, v I)`` with weights ``pi_k``. Under the VP forward process
``x_t = a x0 + s eps`` each component stays Gaussian, ``N(a mu_k, (a^2 v + s^2) I)``, so the noisy
marginal's score, its class posterior (the ideal noisy classifier) and any density ratio are closed
forms. That makes the mixture the exact test bed for CFG, ADM classifier guidance and discriminator
guidance: with exact networks, guidance at scale 1 must reproduce the class-conditional distribution.

>>> mix = GaussianMixture.ring(classes=4)
>>> schedule = fastguide.Schedule.ddpm()
>>> x = fastguide.sample(mix.eps_model(schedule), torch.randn(1000, 2, 1, 1), schedule=schedule,
...                      sampler="ddim", steps=50, y=torch.zeros(1000, dtype=torch.long),
...                      guidance=[fastguide.ClassifierGuidance(mix.noisy_classifier(schedule))])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..samplers.schedule import Schedule


@dataclass
class GaussianMixture:
    means: torch.Tensor      # [K, D]
    var: float               # per-dimension variance of each component
    weights: torch.Tensor    # [K], sums to 1

    @staticmethod
    def ring(classes: int = 4, radius: float = 2.0, var: float = 0.04, dims: int = 2,
             weights: Optional[torch.Tensor] = None) -> "GaussianMixture":
        """``classes`` components evenly spaced on a circle of ``radius`` (in the first two dims)."""
        angle = torch.arange(classes, dtype=torch.float64) * (2 * math.pi / classes)
        means = torch.zeros(classes, dims, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angle.cos(), radius * angle.sin()
        w = torch.full((classes,), 1.0 / classes, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64) / torch.as_tensor(weights, dtype=torch.float64).sum()
        return GaussianMixture(means, float(var), w)

    # -- closed forms at the VP noise level (a, s) -------------------------------------------------
    def _component_log_probs(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x; a mu_k, (a^2 v + s^2) I) for each sample and component, [B, K]."""
        x = x.double().flatten(1)
        a, s = a.double().reshape(-1, 1), s.double().reshape(-1, 1)
        var_t = a * a * self.var + s * s                                   # [B, 1]
        d2 = (x[:, None, :] - a[:, None, :] * self.means[None]).square().sum(-1)   # [B, K]
        dims = x.shape[1]
        return self.weights.log()[None] - 0.5 * d2 / var_t - 0.5 * dims * torch.log(2 * math.pi * var_t)

    def eps(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, y: Optional[torch.Tensor] = None,
            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The exact eps-prediction ``-s * score``; of component ``y`` alone when given, of the mixture
        with ``weights`` (default: the true ones) otherwise."""
        shape, dtype = x.shape, x.dtype
        xf = x.double().flatten(1)
        a64, s64 = a.double().reshape(-1, 1), s.double().reshape(-1, 1)
        var_t = a64 * a64 * self.var + s64 * s64
        logp = self._component_log_probs(x, a, s)
        if weights is not None:
            logp = logp - self.weights.log()[None] + torch.as_tensor(weights, dtype=torch.float64).log()[None]
        if y is not None:
            resp = torch.nn.functional.one_hot(y.long(), len(self.weights)).double()
        else:
            resp = torch.softmax(logp, dim=1)
        mean_t = resp @ self.means * a64                                    # E[a mu | x_t]
        score = -(xf - mean_t) / var_t
        return (-s64 * score).reshape(shape).to(dtype)

    def log_posterior(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log p(k | x_t): the logits of the ideal noisy classifier."""
        return torch.log_softmax(self._component_log_probs(x, a, s), dim=1)

    # -- as fastguide networks on a VP schedule -------------------------------------------------------
    @staticmethod
    def _a_s(schedule: Schedule, t: torch.Tensor):
        abar = torch.from_numpy(schedule.alphas_cumprod)
        tt = t.double().cpu()
        lo = tt.floor().long().clamp(0, len(abar) - 1)
        hi = (lo + 1).clamp(max=len(abar) - 1)
        frac = tt - lo.double()
        ab = (abar[lo] * (1 - frac) + abar[hi] * frac).to(t.device)
        return ab.sqrt(), (1 - ab).sqrt()

    def eps_model(self, schedule: Schedule, weights: Optional[torch.Tensor] = None, null_label: int = -1):
        """``model(x, t, y)``: the exact conditional eps for labels y; label ``null_label`` (or y=None)
        gives the unconditional mixture (with ``weights``, to build a mis-specified model)."""
        def model(x, t, y):
            a, s = self._a_s(schedule, t)
            if y is None:
                return self.eps(x, a, s, weights=weights)
            uncond = self.eps(x, a, s, weights=weights)
            cond = self.eps(x, a, s, y=y.clamp_min(0))
            keep = (y == null_label).reshape((-1,) + (1,) * (x.dim() - 1))
            return torch.where(keep, uncond, cond)
        return model

    def noisy_classifier(self, schedule: Schedule):
        """``classifier(x, t) -> logits``: the exact noisy class posterior (differentiable)."""
        def classifier(x, t):
            a, s = self._a_s(schedule, t)
            return self.log_posterior(x, a, s).to(x.dtype)
        return classifier

    def density_ratio_logit(self, schedule: Schedule, model_weights: torch.Tensor):
        """``discriminator(x, t, y) -> logit``: log p_true,t(x) / p_model,t(x), the optimal discriminator's
        logit against a model that has the wrong mixture ``model_weights``."""
        wrong = torch.as_tensor(model_weights, dtype=torch.float64)
        wrong = wrong / wrong.sum()

        def discriminator(x, t, y):
            a, s = self._a_s(schedule, t)
            logp = self._component_log_probs(x, a, s)
            log_true = torch.logsumexp(logp, dim=1)
            log_model = torch.logsumexp(logp - self.weights.log()[None] + wrong.log()[None], dim=1)
            return (log_true - log_model).to(x.dtype)
        return discriminator

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double().flatten(1), self.means).argmin(dim=1)
