"""Coefficient tables read from diffusers schedulers, for the drop-in ``fastguide.step``.

Every supported scheduler step is one row of ``fastguide.core.layout`` coefficients. The rows are built
here, in float64, from the scheduler's *own* state after ``set_timesteps`` (``alphas_cumprod``,
``timesteps``, ``sigmas``: spacing, Karras sigmas, zero-SNR rescaling and custom schedules are already in
them), with the row primitives the native samplers use (``fastguide.samplers.rows``). Where a diffusers
scheduler differs from the paper or from the native sampler, the builder below says so (DDIM's previous
timestep, Euler's v-prediction sigma, DPM-Solver's lower-order final step). Flow matching
(``FlowMatchEulerDiscreteScheduler``) runs on the flow state ``x = (1 - s) x0 + s eps`` (``flow_plan``), its
two-stage Heun (``FlowMatchHeunDiscreteScheduler``) on the stored derivative (``flow_heun_plan``);
DPM-Solver++ covers its SDE variant (``sde-dpmsolver++``, DPM++ 2M SDE) too, and ``LCMScheduler`` is
``lcm_plan``.

diffusers computes these coefficients in float32; fastguide computes them in float64 and rounds the row
once, so results can differ from diffusers' by diffusers' own fp32 rounding (e.g. ~5e-5 relative in
DDPM's first betas). A degenerate step (e.g. a non-monotone sigma schedule) gets a NaN row where
diffusers' own step returns NaN; the other rows stay finite, and building never raises a math error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..core.layout import Col
from .rows import ddim_noise_std, ddim_update, ddpm_mean, euler_update, prediction_coeffs, row, sqrt

DDPM, DDIM, EULER, EULER_ANCESTRAL, DPM = "ddpm", "ddim", "euler", "euler_ancestral", "dpmsolver++"
FLOW, FLOW_HEUN, LCM, UNIPC = "flow_match_euler", "flow_match_heun", "lcm", "unipc"

# UniPCMultistepScheduler's row blocks, each ``num_steps`` rows (block + order - 1, orders 1 and 2): the
# predictor from the model output, the corrector, and the predictor from the corrected sample and its x0.
UNIPC_PREDICT, UNIPC_CORRECT, UNIPC_PREDICT_FROM_X0 = 0, 2, 4

PREPARE_HELP = ("fastguide.step inside torch.compile needs the scheduler's tables built beforehand: call "
                "fastguide.dropin.prepare(scheduler, device, **step_options) after scheduler.set_timesteps(...) "
                "and outside the compiled function (or run one fastguide.step eagerly first)")


def config(scheduler, name: str, default=None):
    """``scheduler.config[name]`` (``default`` when the scheduler's config has no such key)."""
    return scheduler.config.get(name, default)


@dataclass
class SchedulerPlan:
    """The coefficient rows of one scheduler's current schedule, and what each step needs to know.

    ``rows`` holds ``num_steps`` rows (one per position in ``scheduler.timesteps``); DPM-Solver++ with
    ``solver_order`` 2 or 3 appends ``num_steps`` second-order rows (row ``num_steps + i`` is step ``i`` taken
    with the previous x0) and, for order 3, ``num_steps`` third-order rows (with the x0 before it too), LCM
    ``num_steps`` rows of its ``denoised`` output (row ``num_steps + i``: ``c_skip x + c_out x0^`` of step
    ``i``, no noise), and UniPC six blocks (``unipc_plan``). Per step, ``alpha``/``sigma`` give the state's
    parametrisation ``x = alpha x0 + sigma eps`` (for Euler that is the sigma after churn), which defines the
    score-correction columns (``eps -= sigma g``, ``x0 += sigma^2/alpha g``). ``variance`` is DDPM's fixed
    mean-shift variance (``mu += Sigma g``); None where the model supplies it (learned_range: the DV column) or
    the scheduler has no mean shift.

    >>> plan = fastguide.dropin.plan_for(scheduler)     # after scheduler.set_timesteps(...)
    >>> plan.sigma[i], plan.variance[i]                 # state parametrisation / DDPM variance of step i
    """

    kind: str
    rows: np.ndarray                       # [R, NUM_COLS] float64
    num_steps: int
    alpha: np.ndarray                      # [num_steps]
    sigma: np.ndarray                      # [num_steps]
    draws_noise: np.ndarray                # [num_steps] bool: diffusers draws noise on this step
    variance: Optional[np.ndarray] = None  # [num_steps] DDPM fixed variance for a mean shift
    learned_variance: bool = False         # model output carries 2C channels (DDPM learned_range)
    timestep_rows: Dict[int, int] = field(default_factory=dict)  # DDPM/DDIM/LCM: timestep value -> step
    fp32_noise: bool = False               # diffusers draws the noise in float32, whatever the model's dtype
    # FlowMatchHeunDiscreteScheduler, per step: the first stage's dt (float32, as diffusers stores it), its churn
    # amplitude sqrt(sigma_hat^2 - sigma^2) (float32) and whether a second stage at this step draws noise.
    heun_dt: Optional[np.ndarray] = None
    heun_churn: Optional[np.ndarray] = None
    heun_second_draws: Optional[np.ndarray] = None
    _device_tensors: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Python bools for compiled code (dynamo turns numpy reads into tensor ops it cannot branch on).
        self.noise_steps: Tuple[bool, ...] = tuple(bool(v) for v in self.draws_noise)
        self.any_noise: bool = any(self.noise_steps)

    @property
    def supports_mean_shift(self) -> bool:
        return self.kind == DDPM

    def device_tensor(self, key: tuple, device: torch.device, build: Callable[[], np.ndarray]) -> torch.Tensor:
        """A tensor derived from the plan, copied to ``device`` once and kept with the plan (``build`` makes
        its host array on first use; fp arrays become fp32)."""
        t = self._device_tensors.get((key, device))
        if t is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(PREPARE_HELP)
            host = torch.from_numpy(build())
            t = host.to(device=device, dtype=torch.float32 if host.is_floating_point() else host.dtype)
            self._device_tensors[(key, device)] = t
        return t

    def table(self, device: torch.device) -> torch.Tensor:
        """The fp32 table on ``device``, copied there once."""
        return self.device_tensor(("rows",), device, lambda: self.rows)

    def timestep_values(self, device: torch.device) -> torch.Tensor:
        """DDPM/DDIM: int64 ``[num_steps]`` of the timestep each row belongs to, on ``device`` (copied once);
        compiled code finds a timestep's row on the device with it instead of reading the timestep."""
        def build():
            ts = np.zeros(self.num_steps, dtype=np.int64)
            for value, index in self.timestep_rows.items():
                ts[index] = value
            return ts
        return self.device_tensor(("timesteps",), device, build)

    def row_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The row of a timestep tensor as a 0-dim int64 tensor on the timestep's device, found without a
        host read (the first position holding it, as the host lookup takes). A timestep that is not in the
        schedule is not detected here: that would need a sync."""
        values = self.timestep_values(timestep.device)
        return (values == timestep.reshape(())).to(torch.int64).argmax()


def _f64(t) -> np.ndarray:
    return np.asarray(t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)


def _first_positions(ts: List[int]) -> Dict[int, int]:
    positions: Dict[int, int] = {}
    for i, t in enumerate(ts):
        positions.setdefault(t, i)
    return positions


def ddpm_plan(scheduler) -> SchedulerPlan:
    """Ho et al. 2020 eq. 7 over diffusers' chain: x_prev = c0 x0^ + ct x + std z, noise only when t > 0."""
    abar = _f64(scheduler.alphas_cumprod)
    ts = [int(t) for t in _f64(scheduler.timesteps)]
    n = len(ts)
    pred = config(scheduler, "prediction_type")
    vtype = config(scheduler, "variance_type")
    learned = vtype == "learned_range"
    rows, alpha, sigma, variance = [], np.zeros(n), np.zeros(n), np.zeros(n)
    draws = np.array([t > 0 for t in ts], dtype=bool)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < n else -1
        at = abar[t]
        ap = abar[prev] if prev >= 0 else 1.0
        beta = 1.0 - at / ap
        post_var = max((1.0 - ap) / (1.0 - at) * beta, 1e-20)  # clamped as diffusers does
        a, s = sqrt(at), sqrt(1.0 - at)
        if learned:
            # log Sigma = f log beta_t + (1 - f) log(posterior variance), f = (v + 1) / 2; noise sqrt(Sigma).
            with np.errstate(divide="ignore"):
                upd = dict(LV_MAX=np.log(beta), LV_MIN=np.log(post_var), DV=1.0, EV=1.0 if draws[i] else 0.0)
            variance[i] = np.nan
        else:
            var = beta if vtype == "fixed_large" else post_var  # fixed_small_log: same std, via exp(log/2)
            upd = dict(D=var, E=sqrt(var) if draws[i] else 0.0)
            variance[i] = var
        rows.append(row(prediction_coeffs(pred, a, s, with_eps=False), a, s, **ddpm_mean(at, ap), **upd))
        alpha[i], sigma[i] = a, s
    return SchedulerPlan(DDPM, np.stack(rows), n, alpha, sigma, draws, None if learned else variance, learned,
                         _first_positions(ts))


def ddim_plan(scheduler, eta: float, use_clipped: bool, timesteps: Optional[List[int]] = None) -> SchedulerPlan:
    """Song et al. 2021 eq. 12 as DDIMScheduler takes it: the previous timestep is always
    ``t - num_train_timesteps // num_inference_steps`` (not the next entry of the schedule), so any training
    timestep has a row: ``timesteps`` (default: ``scheduler.timesteps``) are the ones to build."""
    abar = _f64(scheduler.alphas_cumprod)
    final = float(_f64(scheduler.final_alpha_cumprod))
    ts = [int(t) for t in _f64(scheduler.timesteps)] if timesteps is None else list(timesteps)
    n = len(ts)
    stride = int(config(scheduler, "num_train_timesteps")) // int(scheduler.num_inference_steps)
    pred = config(scheduler, "prediction_type")
    rows, alpha, sigma = [], np.zeros(n), np.zeros(n)
    for i, t in enumerate(ts):
        prev = t - stride
        at = abar[t]
        ap = abar[prev] if prev >= 0 else final
        a, s = sqrt(at), sqrt(1.0 - at)
        std = ddim_noise_std(eta, at, ap)
        # eta > 1 can make this negative; diffusers then returns NaN, and so does the row.
        direction = sqrt(1.0 - ap - std * std)
        upd = ddim_update(a, s, sqrt(ap), direction, use_clipped)
        pred_cols = prediction_coeffs(pred, a, s, with_eps=not use_clipped)
        rows.append(row(pred_cols, a, s, E=std if eta > 0 else 0.0, **upd))
        alpha[i], sigma[i] = a, s
    return SchedulerPlan(DDIM, np.stack(rows), n, alpha, sigma, np.full(n, eta > 0),
                         timestep_rows=_first_positions(ts))


def _sigma_prediction(prediction_type: str, sigma_in: float, sigma_hat: float) -> dict:
    """x0 on the state x = x0 + sigma eps; diffusers' Euler converts a v-prediction with the un-churned
    sigma (``sigma_in``) and the others with the churned ``sigma_hat``."""
    c_in = 1.0 / sqrt(sigma_in * sigma_in + 1.0)
    sigma = sigma_in if prediction_type == "v_prediction" else sigma_hat
    return prediction_coeffs(prediction_type, 1.0, sigma, c_in, with_eps=False)


def euler_plan(scheduler, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SchedulerPlan:
    """Euler on the probability-flow ODE with EDM churn (Karras et al. 2022 Alg. 2) as EulerDiscreteScheduler:
    x' = x + s_noise sqrt(sh^2 - s^2) z, x_next = x' + (s_next - sh) (x' - x0^) / sh, sh = s (1 + gamma)."""
    sig = _f64(scheduler.sigmas)
    n = len(sig) - 1
    pred = config(scheduler, "prediction_type")
    # diffusers compares a float32 sigma with the bounds, so compare in float32 too.
    tmin32, tmax32 = np.float32(s_tmin), np.float32(s_tmax)
    rows, sigma = [], np.zeros(n)
    draws = np.zeros(n, dtype=bool)
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if tmin32 <= np.float32(s) <= tmax32 else 0.0
        sh = s * (gamma + 1.0)
        churn = s_noise * sqrt(sh * sh - s * s) if gamma > 0 else 0.0
        pred_cols = _sigma_prediction(pred, s, sh)
        upd = euler_update(sh, nxt)
        # The churn noise is added after the model ran on the un-churned sample (as diffusers does): x0^ and the
        # update read it through P_Z and E.
        r = row(pred_cols, 1.0, sh, P_Z=pred_cols.get(Col.P_X, 0.0) * churn, E=upd["A"] * churn, **upd)
        rows.append(r)
        draws[i] = gamma > 0
        sigma[i] = sh
    return SchedulerPlan(EULER, np.stack(rows), n, np.ones(n), sigma, draws)


def euler_ancestral_plan(scheduler) -> SchedulerPlan:
    """Euler ancestral: step to sigma_down, add sigma_up noise (drawn on every step, even when 0). A step
    with sigma_next > sigma (a non-monotone schedule) has no real sigma_up: its row is NaN, as diffusers'
    step returns NaN there."""
    sig = _f64(scheduler.sigmas)
    n = len(sig) - 1
    pred = config(scheduler, "prediction_type")
    rows, sigma = [], np.zeros(n)
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        up = sqrt(nxt * nxt * (s * s - nxt * nxt) / (s * s))
        down = sqrt(nxt * nxt - up * up)
        rows.append(row(_sigma_prediction(pred, s, s), 1.0, s, E=up, **euler_update(s, down)))
        sigma[i] = s
    return SchedulerPlan(EULER_ANCESTRAL, np.stack(rows), n, np.ones(n), sigma, np.ones(n, dtype=bool))


def _vp_state(sigma: float) -> Tuple[float, float]:
    """(alpha, sigma_vp) of a k-diffusion sigma on the VP state: ``alpha = 1/sqrt(1 + sigma^2)``,
    ``sigma_vp = sigma alpha`` (diffusers' ``_sigma_to_alpha_sigma_t``)."""
    a = 1.0 / sqrt(sigma * sigma + 1.0)
    return a, sigma * a


def dpm_lower_order_final(scheduler, i: int, n: int) -> bool:
    """DPMSolverMultistepScheduler falls back to first order on the last step under these settings."""
    return i == n - 1 and bool(config(scheduler, "euler_at_final") or
                               (config(scheduler, "lower_order_final") and n < 15) or
                               config(scheduler, "final_sigmas_type") == "zero")


def _dpm_d1(sde: bool, heun: bool, h: float, decay: float, a_n: float, r0: float) -> float:
    """The coefficient of ``x0 - x0_prev`` (the D1 term, ``D1 = (x0 - x0_prev) / r0``) in diffusers' 2M update:
    midpoint ``b / 2 D1`` with ``b`` the first-order x0 coefficient; heun ``a_n ((e^-h - 1)/h + 1) D1``, and
    for the SDE variant ``a_n ((1 - e^-2h)/(-2h) + 1) D1``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if sde:
            d2 = decay * decay
            return a_n * ((1.0 - d2) / (-2.0 * h) + 1.0) / r0 if heun else 0.5 * a_n * (1.0 - d2) / r0
        return a_n * ((decay - 1.0) / h + 1.0) / r0 if heun else 0.5 * a_n * (1.0 - decay) / r0


def dpm_step_order(scheduler, i: int, n: int) -> int:
    """The order DPMSolverMultistepScheduler.step takes at step ``i`` of ``n`` (warm-up from its
    ``lower_order_nums``, lower order at the end)."""
    order, warm = int(config(scheduler, "solver_order")), int(scheduler.lower_order_nums)
    if order == 1 or warm < 1 or dpm_lower_order_final(scheduler, i, n):
        return 1
    if order == 2 or warm < 2 or dpm_lower_order_second(scheduler, i, n):
        return 2
    return 3


def dpm_lower_order_second(scheduler, i: int, n: int) -> bool:
    """DPMSolverMultistepScheduler (solver_order=3) takes second order on the step before the last under this
    setting."""
    return i == n - 2 and bool(config(scheduler, "lower_order_final")) and n < 15


def _dpm_3m(sde: bool, h: float, decay: float, a_n: float, r0: float, r1: float) -> Tuple[float, float, float]:
    """The coefficients of (x0, x0_prev, x0_prev2) in the D1 and D2 terms of diffusers' 3M update (Lu et al.
    2022, DPM-Solver++(3M)): ``D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0 + r1)`` with
    ``D1_0 = (m0 - m1)/r0``, ``D1_1 = (m1 - m2)/r1``; D0 = m0 is the first-order term (not included)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if sde:
            d2 = decay * decay
            c1 = a_n * ((1.0 - d2) / (-2.0 * h) + 1.0)
            c2 = a_n * ((1.0 - d2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:
            c1 = a_n * ((decay - 1.0) / h + 1.0)
            c2 = -a_n * ((decay - 1.0 + h) / h ** 2 - 0.5)
        k = r0 / (r0 + r1)
        d1 = np.array([(1.0 + k) / r0, -(1.0 + k) / r0 - k / r1, k / r1])
        d2 = np.array([1.0 / r0, -1.0 / r0 - 1.0 / r1, 1.0 / r1]) / (r0 + r1)
        m0, m1, m2 = c1 * d1 + c2 * d2
    return float(m0), float(m1), float(m2)


def dpm_plan(scheduler) -> SchedulerPlan:
    """DPM-Solver++ (Lu et al. 2022) 1S, 2M and 3M on the VP state, with alpha = 1/sqrt(1+sigma^2),
    sigma_vp = sigma alpha, so exp(-h) = sigma_next / sigma (no log of a zero final sigma needed).

    ``algorithm_type="sde-dpmsolver++"`` (DPM++ 2M SDE, Lu et al. 2022 / k-diffusion's ``dpmpp_2m_sde``, as
    diffusers takes it): ``x_next = (s_n / s) e^-h x + a_n (1 - e^-2h) D0 + d1 D1 + s_n sqrt(1 - e^-2h) z``,
    with the noise drawn in float32 on every step (also the last, where it has amplitude 0 when the final
    sigma is 0). Rows: ``num_steps`` first-order rows, then (solver_order >= 2) ``num_steps`` second-order rows
    (the previous x0 in column F), then (solver_order 3) ``num_steps`` third-order rows (the x0 before it in
    column F2)."""
    sig = _f64(scheduler.sigmas)
    n = len(scheduler.timesteps)
    pred = config(scheduler, "prediction_type")
    order = int(config(scheduler, "solver_order"))
    heun = config(scheduler, "solver_type") == "heun"
    sde = config(scheduler, "algorithm_type") == "sde-dpmsolver++"
    blocks: List[List[np.ndarray]] = [[] for _ in range(order)]
    alpha, sigma = np.zeros(n), np.zeros(n)

    def log_ratio(a: float, b: float) -> np.float64:  # (numpy: a zero divisor gives inf/NaN, not an error)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.float64(a) / b)

    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        a_s, s_s = _vp_state(s)
        a_n, s_n = _vp_state(nxt)
        decay = nxt / s  # exp(-h)
        pred_cols = prediction_coeffs(pred, a_s, s_s, with_eps=False)
        if sde:
            upd = dict(A=s_n / s_s * decay, B=a_n * (1.0 - decay * decay), E=s_n * sqrt(1.0 - decay * decay))
        else:
            upd = dict(A=s_n / s_s, B=a_n * (1.0 - decay))
        first = row(pred_cols, a_s, s_s, **upd)
        blocks[0].append(first)
        alpha[i], sigma[i] = a_s, s_s
        final = dpm_lower_order_final(scheduler, i, n)
        # A repeated sigma (h = 0 or h_prev = 0) makes these non-finite, as in diffusers' own step.
        h = log_ratio(s, nxt)
        with np.errstate(divide="ignore", invalid="ignore"):
            r0 = log_ratio(sig[i - 1], s) / h if i > 0 else math.nan
            r1 = log_ratio(sig[i - 2], sig[i - 1]) / h if i > 1 else math.nan
        if order >= 2:
            second = first
            if i > 0 and nxt > 0 and not final:
                d1 = _dpm_d1(sde, heun, h, decay, a_n, r0)
                # x_next = ... + B x0 + d1 (x0 - x0_prev), the D1 term of the 2M update.
                second = row(pred_cols, a_s, s_s, **dict(upd, B=upd["B"] + d1, F=-d1))
            blocks[1].append(second)
        if order == 3:
            third = blocks[1][-1]
            if i > 1 and nxt > 0 and not final and not dpm_lower_order_second(scheduler, i, n):
                c0, c1, c2 = _dpm_3m(sde, h, decay, a_n, r0, r1)
                third = row(pred_cols, a_s, s_s, **dict(upd, B=upd["B"] + c0, F=c1, F2=c2))
            blocks[2].append(third)
    return SchedulerPlan(DPM, np.stack([r for block in blocks for r in block]), n, alpha, sigma, np.full(n, sde),
                         fp32_noise=True)


def lcm_plan(scheduler) -> SchedulerPlan:
    """LCMScheduler (Luo et al. 2023, multistep consistency sampling) as its ``step`` computes it, on
    ``x = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``:

    * x0^ from the prediction type (clipped / thresholded as configured), then the boundary-condition
      ``denoised = c_skip x + c_out x0^`` with ``c_skip = 0.25 / (u^2 + 0.25)``, ``c_out = u / sqrt(u^2 + 0.25)``,
      ``u = timestep_scaling * t`` (sigma_data = 0.5);
    * ``x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z``, the previous timestep being the next entry
      of ``scheduler.timesteps`` (the step's own timestep past the end); on the step with index
      ``num_inference_steps - 1`` no noise is drawn and ``x_prev = denoised``. (With custom timesteps and
      ``strength < 1`` the schedule is shorter than ``num_inference_steps``, so every step draws.)

    The second block (row ``num_steps + i``) computes ``denoised`` alone, the step's second output."""
    abar = _f64(scheduler.alphas_cumprod)
    final = float(_f64(scheduler.final_alpha_cumprod))
    ts = [int(t) for t in _f64(scheduler.timesteps)]
    n = len(ts)
    last = int(scheduler.num_inference_steps) - 1
    pred = config(scheduler, "prediction_type")
    scaling = float(config(scheduler, "timestep_scaling"))
    rows, denoised_rows, alpha, sigma = [], [], np.zeros(n), np.zeros(n)
    draws = np.array([i != last for i in range(n)], dtype=bool)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < n else t
        at = abar[t]
        ap = abar[prev] if prev >= 0 else final
        a, s = sqrt(at), sqrt(1.0 - at)
        u = t * scaling
        c_skip, c_out = 0.25 / (u * u + 0.25), u / sqrt(u * u + 0.25)
        pred_cols = prediction_coeffs(pred, a, s, with_eps=False)
        keep = sqrt(ap) if draws[i] else 1.0
        rows.append(row(pred_cols, a, s, A=keep * c_skip, B=keep * c_out, E=sqrt(1.0 - ap) if draws[i] else 0.0))
        denoised_rows.append(row(pred_cols, a, s, A=c_skip, B=c_out))
        alpha[i], sigma[i] = a, s
    return SchedulerPlan(LCM, np.stack(rows + denoised_rows), n, alpha, sigma, draws,
                         timestep_rows=_first_positions(ts))


def flow_plan(scheduler) -> SchedulerPlan:
    """FlowMatchEulerDiscreteScheduler on the flow state ``x = (1 - s) x0 + s eps`` with the velocity
    ``v = eps - x0`` (so ``x0^ = x - s v``, ``eps = x + (1 - s) v``), from its own ``sigmas`` (shift, dynamic
    shifting, shift_terminal, inverted, Karras / exponential / beta sigmas and custom schedules are in them):

    * deterministic: ``x + (s_next - s) v``, written ``x - h x0^ + h eps`` (h = s_next - s) so no column divides
      by s or 1 - s (both 0 somewhere: s = 1 at the start, s = 0 at an inverted start);
    * ``stochastic_sampling``: ``(1 - s_next) x0^ + s_next z``, a fresh draw on every step (also the last,
      where s_next = 0), as diffusers draws it.

    The score columns are the flow state's (alpha = 1 - s, sigma = s: ``v -= s/(1-s) g``); at s = 1 they are 0,
    so that step is not guided (``rows.score_cols``)."""
    sig = _f64(scheduler.sigmas)
    n = len(sig) - 1
    stochastic = bool(config(scheduler, "stochastic_sampling", False))
    rows, alpha, sigma = [], np.zeros(n), np.zeros(n)
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        pred = prediction_coeffs("flow_prediction", 1.0 - s, s, with_eps=not stochastic)
        if stochastic:
            rows.append(row(pred, 1.0 - s, s, B=1.0 - nxt, E=nxt))
        else:
            rows.append(row(pred, 1.0 - s, s, A=1.0, B=-(nxt - s), C=nxt - s))
        alpha[i], sigma[i] = 1.0 - s, s
    return SchedulerPlan(FLOW, np.stack(rows), n, alpha, sigma, np.full(n, stochastic), fp32_noise=True)


def flow_heun_plan(scheduler, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SchedulerPlan:
    """FlowMatchHeunDiscreteScheduler (Karras et al. 2022 Alg. 2 on the flow ODE, as its ``step`` computes it).
    Its schedule repeats every sigma but the first (``timesteps`` has ``2N - 1`` entries, ``sigmas`` ``2N``:
    ``[s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]``), and each call is a first or a second stage by whether it holds
    a ``dt``. At step ``k`` (``gamma`` from the stage's own sigma, ``s_churn / (2N - 1)`` capped as there):

    * first stage, rows ``[0, n)``: ``s = sigmas[k]``, ``sh = s (1 + gamma)``; churn ``x' = x + s_noise
      sqrt(sh^2 - s^2) z`` is added outside the kernel (it is also the stored sample); the derivative
      ``d = (x' - (x' - s v)) / sh = (s / sh) v`` is the row's x0^ (``P_M = s / sh``, so the kernel writes
      it through ``x0_out`` in the same pass) and ``x_next = x' + dt d``, ``dt = sigmas[k + 1] - sh``. The last
      step (to sigma 0) is a first stage too: diffusers ends there.
    * second stage, rows ``[n, 2n)``: the kernel's x is the *stored* sample and ``x0_prev`` the stored
      derivative; the new derivative ``(x - (x - s_next v)) / s_next = v`` is x0^, and
      ``x_next = sample + dt (d + v) / 2`` (``A = 1``, ``B = F = dt / 2``, dt the first stage's). The current
      sample enters only through churn noise that cancels (diffusers still draws it). Row ``n`` (step 0) has
      no first stage before it: NaN.

    ``P_G`` is the derivative's response to a score correction ``v -= s/(1-s) g``. sigma_hat, dt and the churn
    amplitude are computed in float32 as diffusers does, so the stored ``dt`` is bit-identical to diffusers'."""
    sig32 = scheduler.sigmas.detach().float().cpu().numpy()
    sig = sig32.astype(np.float64)
    n = len(sig) - 1
    tmin32, tmax32 = np.float32(s_tmin), np.float32(s_tmax)
    gammas = [min(s_churn / n, 2 ** 0.5 - 1) if tmin32 <= s <= tmax32 else 0.0 for s in sig32]
    sh32 = np.array([sig32[k] * np.float32(gammas[k] + 1.0) for k in range(n)], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        dt32 = (sig32[1:] - sh32).astype(np.float32)
        churn32 = np.sqrt(sh32 * sh32 - sig32[:n] * sig32[:n]).astype(np.float32)
    first_rows, second_rows = [], []
    for k in range(n):
        s, sh, dt = sig[k], float(sh32[k]), float(dt32[k])
        r = row({Col.P_M: s / sh}, 1.0 - s, s, A=1.0, B=dt)
        r[Col.P_G] = -r[Col.P_G] / sh
        first_rows.append(r)
        half = 0.5 * float(dt32[k - 1]) if k > 0 else np.nan
        r = row({Col.P_M: 1.0}, 1.0 - s, s, A=1.0, B=half, F=half)
        r[Col.P_G] = -r[Col.P_G] / s
        second_rows.append(r)
    second_draws = np.array([k > 0 and gammas[k - 1] > 0 for k in range(n)], dtype=bool)
    return SchedulerPlan(FLOW_HEUN, np.stack(first_rows + second_rows), n, 1.0 - sig[:n], sig[:n].copy(),
                         np.array([g > 0 for g in gammas[:n]], dtype=bool), heun_dt=dt32, heun_churn=churn32,
                         heun_second_draws=second_draws)


def _unipc_alpha_sigma(scheduler) -> Callable[[float], Tuple[float, float]]:
    """UniPCMultistepScheduler's ``_sigma_to_alpha_sigma_t``: the VP state of a sigma, or the flow state."""
    if config(scheduler, "use_flow_sigmas", False):
        return lambda s: (1.0 - s, s)
    return _vp_state


def _unipc_rhos(hh: float, b_h: float, rk: Optional[float]) -> np.ndarray:
    """UniC's weights (Zhao et al. 2023, eq. 8 with B(h)): order 1 uses 1/2; order 2 solves
    ``R rho = b`` with ``R = [[1, 1], [rk, 1]]``, ``b_k = h phi_{k+1}(h) k! / B(h)``."""
    if rk is None:
        return np.array([0.5])
    h_phi_k = np.expm1(hh) / hh - 1.0
    b = [h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2.0 / b_h]
    try:
        return np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
    except np.linalg.LinAlgError:  # a repeated sigma: rk = 1
        return np.array([math.nan, math.nan])


def _unipc_update(lam: np.ndarray, sig_t: float, sig_s0: float, a_t: float, t: int, s0: int, back: Optional[int],
                  bh1: bool, corrector: bool) -> Dict[str, float]:
    """Update columns of UniP (predictor: x is the sample, x0^ the new x0 m0, F the previous x0) or UniC
    (corrector: x is the last sample, x0^ this step's x0, F the previous x0 m0, F2 the one before), from
    diffusers' ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update`` with ``predict_x0``:
    ``x_t = (sig_t / sig_s0) x - a_t h phi_1 m0 - a_t B(h) sum_k rho_k D_k``, ``D_k = (m_k - m0) / r_k``, the
    corrector's last D being this step's x0 minus m0 (``r = 1``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam[t] - lam[s0]
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = hh if bh1 else np.expm1(hh)
        rk = (lam[back] - lam[s0]) / h if back is not None else None
        ab = a_t * b_h
        m0 = -a_t * h_phi_1  # the coefficient of m0
        cols = dict(A=sig_t / sig_s0)
        if corrector:
            rho = _unipc_rhos(hh, b_h, rk)
            cols.update(B=-ab * rho[-1], F=m0 + ab * rho[-1])
            if rk is not None:
                cols.update(F=cols["F"] + ab * rho[0] / rk, F2=-ab * rho[0] / rk)
        elif rk is not None:     # order 2: rho = 1/2
            cols.update(B=m0 + ab * 0.5 / rk, F=-ab * 0.5 / rk)
        else:                    # order 1: diffusers subtracts a_t B(h) * 0 (NaN where B(h) is infinite)
            cols.update(B=m0 - ab * 0.0)
    return {k: float(v) for k, v in cols.items()}


def unipc_plan(scheduler) -> SchedulerPlan:
    """UniPCMultistepScheduler (Zhao et al. 2023, UniPC with B(h) = h ("bh1") or e^h - 1 ("bh2"), orders 1 and
    2, x0-prediction ``predict_x0=True``) as its ``step`` computes it on ``x = alpha x0 + sigma eps``.

    A step at index i evaluates the model at the predictor's output x_i; its x0^ m_i (from the prediction type,
    thresholded as configured) first corrects the *last* sample (UniC, with m_{i-1} and, at order 2, m_{i-2}),
    then the predictor (UniP) advances the corrected sample with m_i (and m_{i-1} at order 2). Three row
    blocks, one row per step and order (``UNIPC_*``): the predictor from the model output (a step without the
    corrector: one fused pass), the corrector (its x input is the last sample and its model output m_i itself,
    "sample" prediction), and the predictor from the corrected sample and m_i. Coefficients in float64 where
    diffusers computes them in float32."""
    sig = _f64(scheduler.sigmas)
    n = len(scheduler.timesteps)
    state = _unipc_alpha_sigma(scheduler)
    pairs = [state(float(s)) for s in sig]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.array([np.log(np.float64(a)) - np.log(np.float64(sg)) for a, sg in pairs])
    bh1 = config(scheduler, "solver_type") == "bh1"
    pred = config(scheduler, "prediction_type")
    blocks: List[List[np.ndarray]] = [[] for _ in range(6)]
    for i in range(n):
        a_s, s_s = pairs[i]
        model_cols = prediction_coeffs(pred, a_s, s_s, with_eps=False)
        x0_cols = {Col.P_M: 1.0}
        for order in (1, 2):
            back = i - 1 if order == 2 and i >= 1 else None
            upd = _unipc_update(lam, pairs[i + 1][1], s_s, pairs[i + 1][0], i + 1, i, back, bh1, False)
            blocks[UNIPC_PREDICT + order - 1].append(row(model_cols, a_s, s_s, **upd))
            blocks[UNIPC_PREDICT_FROM_X0 + order - 1].append(row(x0_cols, a_s, s_s, **upd))
            if i >= 1:
                back = i - 2 if order == 2 and i >= 2 else None
                upd = _unipc_update(lam, s_s, pairs[i - 1][1], a_s, i, i - 1, back, bh1, True)
            blocks[UNIPC_CORRECT + order - 1].append(row(x0_cols, a_s, s_s, **upd) if i >= 1 else
                                                     np.full(len(Col), np.nan))
    alpha = np.array([p[0] for p in pairs[:n]])
    sigma = np.array([p[1] for p in pairs[:n]])
    return SchedulerPlan(UNIPC, np.stack([r for block in blocks for r in block]), n, alpha, sigma,
                         np.zeros(n, dtype=bool))


BUILDERS = {DDPM: ddpm_plan, DDIM: ddim_plan, EULER: euler_plan, EULER_ANCESTRAL: euler_ancestral_plan,
            DPM: dpm_plan, FLOW: flow_plan, FLOW_HEUN: flow_heun_plan, LCM: lcm_plan, UNIPC: unipc_plan}
