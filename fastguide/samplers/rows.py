"""Row primitives shared by every table builder: the native samplers (``fastguide.samplers.native``) and
the tables read from diffusers schedulers (``fastguide.samplers.scheduler_tables``).

A row (``fastguide.core.layout``) has three parts: how x0 and eps follow from the state and the model
output (the prediction-type conversion), how a score-correction gradient enters them, and the update
columns of the sampler. Values are float64; a degenerate schedule gives inf/NaN columns (as diffusers'
own arithmetic does) rather than a Python division error, and the builders decide what to do with them.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from ..core.layout import NUM_COLS, Col

Cols = Dict[Col, float]


def _div(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def sqrt(v: float) -> float:
    """The square root, NaN for a negative argument (as torch's arithmetic gives in diffusers' own step)."""
    return math.sqrt(v) if v >= 0 else math.nan


def prediction_coeffs(prediction_type: str, alpha: float, sigma: float, c_in: float = 1.0,
                      with_eps: bool = True) -> Cols:
    """x0 (and eps, with ``with_eps``) as linear functions of (x, m) on the state ``x = alpha x0 + sigma eps``
    for a model that sees ``c_in * x``.

    The model's own parametrisation is ``c_in x = a_m x0 + s_m eps`` with ``a_m = c_in alpha``,
    ``s_m = c_in sigma``; v-prediction (Salimans & Ho 2022) is ``v = a_m eps - s_m x0`` with
    ``a_m^2 + s_m^2 = 1``. A flow (rectified-flow) model returns the velocity ``v = eps - x0``
    (``"flow_prediction"``, as diffusers names it): ``c_in x = (a_m + s_m) x0 + s_m v``, so on the flow state
    ``x = (1 - s) x0 + s eps`` (c_in = 1) ``x0 = x - s v`` and ``eps = x + (1 - s) v``. Samplers whose update
    never reads eps pass ``with_eps=False``, so an eps column that is infinite at a degenerate step
    (``1/sigma`` at sigma = 0) cannot reach the result.
    """
    if prediction_type == "epsilon":
        x0 = {Col.P_X: _div(1.0, alpha), Col.P_M: _div(-sigma, alpha)}
        eps = {Col.Q_M: 1.0}
    elif prediction_type in ("sample", "original_sample"):
        x0 = {Col.P_M: 1.0}
        eps = {Col.Q_X: _div(1.0, sigma), Col.Q_M: _div(-alpha, sigma)}
    elif prediction_type == "v_prediction":
        a_m, s_m = c_in * alpha, c_in * sigma
        x0 = {Col.P_X: a_m * c_in, Col.P_M: -s_m}
        eps = {Col.Q_X: s_m * c_in, Col.Q_M: a_m}
    elif prediction_type == "flow_prediction":
        a_m, s_m = c_in * alpha, c_in * sigma
        x0 = {Col.P_X: _div(c_in, a_m + s_m), Col.P_M: _div(-s_m, a_m + s_m)}
        eps = {Col.Q_X: _div(c_in, a_m + s_m), Col.Q_M: _div(a_m, a_m + s_m)}
    else:
        raise ValueError(f"prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction', "
                         f"got {prediction_type!r}")
    return {**x0, **eps} if with_eps else x0


def score_cols(alpha: float, sigma: float) -> Cols:
    """Score correction (guided-diffusion ``condition_score``) on the state ``x = alpha x0 + sigma eps``:
    ``eps' = eps - sigma g``, hence ``x0' = x0 + sigma^2 / alpha g``.

    At ``alpha = 0`` (the flow state at s = 1, pure noise) ``sigma^2 / alpha`` is infinite while a noisy
    classifier's gradient is 0 there (``p(y | x) = p(y)``): the product has a finite limit, but no network
    gives it, and inf times a gradient would be inf/NaN. So the columns are 0 and that step is taken without
    the correction (on a flow schedule its first step: an O(h) departure from the guided ODE). Only flow
    schedules reach alpha = 0; VP alphas stay above 0."""
    if alpha == 0.0:
        return {Col.Q_G: 0.0, Col.P_G: 0.0}
    return {Col.Q_G: -sigma, Col.P_G: _div(sigma * sigma, alpha)}


def score_shift(r: np.ndarray) -> float:
    """How a score-correction gradient ``g`` moves the output of row ``r``: ``out += (B P_G + C Q_G) g``
    (flow rows put this in the mean-shift column ``D``, so an x0^-gradient enters as a score correction)."""
    return float(r[Col.B] * r[Col.P_G] + r[Col.C] * r[Col.Q_G])


def row(prediction: Cols, alpha: float, sigma: float, **update: float) -> np.ndarray:
    """A coefficient row: the prediction conversion, the score-correction columns of the state
    ``(alpha, sigma)`` and the update columns given by name (``A=..., B=..., E=...``)."""
    r = np.zeros(NUM_COLS)
    for col, v in prediction.items():
        r[col] = v
    for col, v in score_cols(alpha, sigma).items():
        r[col] = v
    for name, v in update.items():
        r[Col[name]] = v
    return r


def euler_update(sigma: float, sigma_to: float) -> Dict[str, float]:
    """An Euler step of the probability-flow ODE from ``sigma`` to ``sigma_to`` on ``x = x0 + sigma eps``:
    ``x + (sigma_to - sigma) (x - x0^) / sigma`` (Karras et al. 2022, Alg. 2 without the correction)."""
    ratio = _div(sigma_to - sigma, sigma)
    return dict(A=1.0 + ratio, B=-ratio)


def ddpm_mean(abar: float, abar_prev: float) -> Dict[str, float]:
    """The posterior mean of Ho et al. 2020 eq. 7 on ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``:
    ``mu = c0 x0^ + ct x_t`` with ``beta = 1 - abar/abar_prev``,
    ``c0 = sqrt(abar_prev) beta / (1 - abar)``, ``ct = sqrt(1 - beta) (1 - abar_prev) / (1 - abar)``."""
    beta = 1.0 - abar / abar_prev
    return dict(A=_div(sqrt(abar / abar_prev) * (1.0 - abar_prev), 1.0 - abar),
                B=_div(sqrt(abar_prev) * beta, 1.0 - abar))


def ddim_noise_std(eta: float, abar: float, abar_prev: float) -> float:
    """Song et al. 2021 eq. 16: ``sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)``."""
    return eta * sqrt(_div(1.0 - abar_prev, 1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_update(alpha: float, sigma: float, alpha_prev: float, direction: float, clipped: bool) -> Dict[str, float]:
    """Song et al. 2021 eq. 12: ``x_prev = alpha_prev x0^ + direction eps + std z`` (the noise column is the
    caller's). With ``clipped`` eps is re-derived from the clipped x0^, ``eps = (x - alpha x0^) / sigma``,
    folded into the x and x0^ columns (guided-diffusion's ``ddim_sample``, diffusers' use_clipped_model_output)."""
    if clipped:
        return dict(A=_div(direction, sigma), B=alpha_prev - _div(direction * alpha, sigma))
    return dict(B=alpha_prev, C=direction)
