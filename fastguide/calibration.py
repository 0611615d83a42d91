"""Calibration of a guidance classifier on the inputs it sees while guiding: integral ECE (Ma et al. 2023).

Ma et al. (Sec. 4) argue that a classifier guides well when its class posterior is *calibrated* along
the sampling trajectory, and measure it with an integral expected calibration error,
``ECE = (1/k) sum_t ECE_t``. The paper's exact protocol (bins, which timesteps, which images) is not
available to us, so fastguide defines it as follows and every number it reports uses this definition:

* ``ECE_t`` is the standard binned ECE (Guo et al. 2017): confidence = the maximum softmax probability,
  prediction = its argmax, ``M`` equal-width bins ``((m-1)/M, m/M]`` over [0, 1],
  ``ECE_t = sum_m |B_m|/n * |acc(B_m) - conf(B_m)|``.
* The inputs at timestep t are what guidance feeds the classifier: ``input="xt"`` (ADM) the noised
  ``x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) eps`` with the timestep t; ``input="x0"`` (Ma et al.) the
  denoiser's prediction ``x0^(x_t)`` (clipped to ``clip`` as the sampler clips it) with the same t.
* ``x0`` are real labelled images (use held-out ones), noised once per timestep with fresh noise from
  ``generator``; ``timesteps`` are the training timesteps the sampler visits (its respaced steps).
* The integral ECE is the plain mean of ``ECE_t`` over ``timesteps``.

>>> ts = schedule.timesteps(50)
>>> fastguide.calibration.integral_ece(clf, x_real, y_real, schedule=schedule, timesteps=ts)
>>> fastguide.calibration.integral_ece(clf, x_real, y_real, schedule=schedule, timesteps=ts, input="x0",
...                                    denoiser=lambda x, t: unet(x, t, y_real))
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .samplers.schedule import Schedule
from .training import alpha_sigma, q_sample


def binned_ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """The binned expected calibration error of ``softmax(logits)`` against ``labels``.

    ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|`` over ``bins`` equal-width confidence bins ``((m-1)/M, m/M]``.

    >>> binned_ece(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))   # conf 0.881, acc 0.5
    0.3807970779778823
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [N, K] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be a [{logits.shape[0]}] tensor")
    if logits.shape[0] == 0:
        raise ValueError("binned_ece needs at least one sample")
    probs = torch.softmax(logits.detach().double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).double()
    # Bin m holds confidences in ((m-1)/M, m/M]; ceil puts a confidence on a bin edge into the lower bin.
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index.cpu(), conf.cpu())
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index.cpu(), correct.cpu())
    # |B_m|/n * |acc_m - conf_m| = |sum(correct) - sum(conf)| / n within each bin.
    return float((acc_sum - conf_sum).abs().sum() / logits.shape[0])


def _x0_from_output(schedule: Schedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(schedule, t, x_t)
    out = out[:, : x_t.shape[1]]  # a learned-range model's variance channels are not needed here
    if schedule.prediction_type == "epsilon":
        return (x_t - s * out) / a
    if schedule.prediction_type == "sample":
        return out
    return a * x_t - s * out  # v-prediction


def ece_per_timestep(classifier: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor, *,
                     schedule: Schedule, timesteps: Union[Sequence[int], np.ndarray, torch.Tensor], bins: int = 15,
                     input: str = "xt", denoiser: Optional[Callable[..., torch.Tensor]] = None,
                     clip: Optional[Tuple[float, float]] = (-1.0, 1.0),
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``ECE_t`` for each of ``timesteps`` (float64 tensor, same order); see the module docstring.

    ``classifier(inp, t) -> logits [N, K]`` with t a [N] float tensor of training timesteps;
    ``denoiser(x_t, t)`` (``input="x0"`` only) returns the schedule's prediction type for the whole batch
    (close over the labels for a conditional model). Networks run without gradients.

    >>> ece_t = ece_per_timestep(clf, x, y, schedule=s, timesteps=[999, 500, 10])
    """
    if input not in ("xt", "x0"):
        raise ValueError(f"input must be 'xt' or 'x0', got {input!r}")
    if input == "x0" and denoiser is None:
        raise ValueError("input='x0' needs the denoiser whose x0^ the classifier sees")
    if not isinstance(schedule, Schedule) or schedule.kind != "vp":
        raise ValueError("schedule must be a VP fastguide.Schedule (Schedule.ddpm)")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2:
        raise ValueError("x0 must be a [N, C, ...] tensor of clean images")
    if not isinstance(y, torch.Tensor) or y.shape != x0.shape[:1]:
        raise ValueError(f"y must be a [{x0.shape[0]}] tensor of labels")
    ts = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    if not ts:
        raise ValueError("timesteps must not be empty")
    T = schedule.num_train_timesteps
    if min(ts) < 0 or max(ts) >= T:
        raise ValueError(f"timesteps must lie in [0, {T}), got {ts}")
    eces = []
    with torch.no_grad():
        for t_int in ts:
            t = torch.full((x0.shape[0],), t_int, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            x_t = q_sample(schedule, x0, t, noise)
            inp = x_t
            if input == "x0":
                inp = _x0_from_output(schedule, denoiser(x_t, t.float()), x_t, t)
                if clip is not None:
                    inp = inp.clamp(clip[0], clip[1])
            eces.append(binned_ece(classifier(inp, t.float()), y, bins))
    return torch.tensor(eces, dtype=torch.float64)


def integral_ece(classifier: Callable[..., torch.Tensor], x0: torch.Tensor, y: torch.Tensor, *,
                 schedule: Schedule, timesteps: Union[Sequence[int], np.ndarray, torch.Tensor], bins: int = 15,
                 input: str = "xt", denoiser: Optional[Callable[..., torch.Tensor]] = None,
                 clip: Optional[Tuple[float, float]] = (-1.0, 1.0),
                 generator: Optional[torch.Generator] = None) -> float:
    """Integral ECE: the mean over ``timesteps`` of the binned ECE of ``classifier`` on the inputs it sees
    during guidance (noised ``x_t`` for ``input="xt"``, the denoiser's clipped ``x0^`` for ``input="x0"``).

    >>> integral_ece(noisy_clf, x_real, y_real, schedule=s, timesteps=s.timesteps(25))
    >>> integral_ece(clean_clf, x_real, y_real, schedule=s, timesteps=s.timesteps(25), input="x0",
    ...              denoiser=lambda x, t: unet(x, t, None))
    """
    return float(ece_per_timestep(classifier, x0, y, schedule=schedule, timesteps=timesteps, bins=bins,
                                  input=input, denoiser=denoiser, clip=clip, generator=generator).mean())
