"""Native samplers as coefficient tables: each sampler is a short function from a schedule to step rows.

Every model evaluation is one *stage*; a stage has one row of ``fastguide.core.layout`` coefficients plus the
static facts the loop needs (the model's timestep and input scale, whether noise is drawn, what the
guidance networks see). VP samplers (``ddpm``, ``ddim``) run on the VP state ``x_t = a x0 + s eps``
(guided-diffusion); sigma samplers (``euler``, ``euler_ancestral``, ``heun``, ``dpmpp_2m``) run on the
k-diffusion/EDM state ``x = x0 + sigma eps``, also for VP schedules (the model then sees
``x / sqrt(1 + sigma^2)`` and the training timestep). A unit-Gaussian ``x_T`` starts a sigma sampler at
``sigma_max x_T`` for EDM and at ``sqrt(1 + sigma_max^2) x_T`` for a VP schedule (the VP ``x_T`` in sigma
state; diffusers' ``init_noise_sigma`` with ``leading`` spacing), where k-diffusion's samplers, and diffusers'
with ``linspace``/``trailing`` spacing, start a VP model at ``sigma_max x_T`` (a difference of
``1 / (2 sigma_max^2)`` relative, 1e-4 at sigma_max = 80). Otherwise the sigma samplers on a VP schedule are
k-diffusion's with its VP denoiser wrappers and diffusers' Euler / Euler ancestral / Heun / DPM-Solver++
schedulers, step for step.

On a flow schedule (``Schedule.flow``: ``x = (1 - s) x0 + s eps``, the model predicting ``v = eps - x0``)
``euler`` and ``heun`` integrate ``dx/ds = v = (x - x0^) / s`` with ``x0^ = x - s v``: the same update
columns as on the sigma state, with the flow prediction and the flow state's score columns
(``alpha = 1 - s``). They equal diffusers' ``FlowMatchEulerDiscreteScheduler`` and
``FlowMatchHeunDiscreteScheduler`` loops step for step.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import List

import numpy as np
import torch

from ..core.checks import check_int, check_nonneg, check_real
from ..core.layout import Col
from .rows import ddim_noise_std, ddim_update, ddpm_mean, euler_update, prediction_coeffs, row, score_shift
from .schedule import Schedule, vp_time_of_sigma

VP_SAMPLERS = ("ddpm", "ddim")
SIGMA_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m")
SAMPLERS = VP_SAMPLERS + SIGMA_SAMPLERS
FLOW_SAMPLERS = ("euler", "heun")   # the samplers that run on a flow schedule


@dataclass(frozen=True)
class Stage:
    """Static facts about one model evaluation of a sampler run."""

    step: int                 # sampling step this stage belongs to, 0 .. steps-1
    t_model: float            # the model's timestep (training timestep for VP schedules, sigma for EDM)
    c_in: float               # the model sees c_in * x
    alpha: float              # state parametrisation at this stage: x = alpha * x0 + sigma * eps
    sigma: float
    vp_time: float            # VP time in [0, 1]: t / T for VP schedules, tau(sigma) for EDM
    guide_t: float            # timestep given to classifiers / discriminators
    guide_in: float           # guidance networks see guide_in * x (the VP view of the state)
    pre_noise: float = 0.0    # churn: x += pre_noise * z before the model call
    noise: bool = False       # the row uses fresh noise z
    uses_x0_prev: bool = False
    second_stage: bool = False  # Heun's correction stage
    variance: float = 0.0     # Sigma for mean-shift guidance (VP samplers); 0 for sigma samplers; flow: D


@dataclass
class Plan:
    """A sampler run: the coefficient table (float64, host) and its stages."""

    sampler: str
    schedule: Schedule
    steps: int
    rows: np.ndarray                  # [stages, NUM_COLS] float64
    stages: List[Stage]
    init_scale: float                 # x_T (unit Gaussian) is scaled by this to start
    learned_variance: bool = False
    max_variance: float = 0.0         # largest variance the run can use (Ma et al.'s Sigma_max)
    options: dict = field(default_factory=dict)

    @property
    def table(self) -> torch.Tensor:
        """The fp32 table the kernels read, on the host (move it to the sample's device once)."""
        return torch.from_numpy(self.rows).float()


# ---------------------------------------------------------------------------------------------------
# VP samplers (guided-diffusion's respaced chain)

def _vp_chain(schedule: Schedule, steps: int):
    ts = schedule.timesteps(steps).astype(np.int64)
    if np.any(ts < 0) or np.any(ts >= schedule.num_train_timesteps) or np.any(np.diff(ts) >= 0):
        raise ValueError(f"timestep spacing {schedule.timestep_spacing!r} with steps={steps} gives invalid "
                         f"timesteps {ts.tolist()}")
    abar = schedule.alphas_cumprod[ts]
    abar_prev = np.append(abar[1:], 1.0)
    beta = 1.0 - abar / abar_prev
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    # guided-diffusion replaces the zero posterior variance of the final step by the next one, in the
    # clipped log variance and in fixed_large.
    post_var_clipped = post_var.copy()
    if len(ts) > 1:
        post_var_clipped[-1] = post_var[-2]
    else:
        # A one-step chain has no next posterior variance (guided-diffusion would index past its end); its
        # only step is the final one, whose posterior variance is 0 and whose log would be -inf. Use beta.
        post_var_clipped[-1] = beta[-1]
    return ts, abar, abar_prev, beta, post_var, post_var_clipped


def _vp_stage(schedule: Schedule, i: int, t: int, a: float, s: float, **kw) -> Stage:
    T = schedule.num_train_timesteps
    return Stage(step=i, t_model=float(t), c_in=1.0, alpha=a, sigma=s, vp_time=t / T, guide_t=float(t),
                 guide_in=1.0, **kw)


def ddpm(schedule: Schedule, steps: int) -> Plan:
    """Ancestral DDPM (Ho et al. 2020 eq. 7) on the respaced chain, as guided-diffusion's ``p_sample``:
    ``x_{t-1} = c0 x0^ + ct x_t + sqrt(Sigma_t) z``, Sigma fixed_small / fixed_large / learned_range."""
    ts, abar, abar_prev, beta, post_var, post_var_clipped = _vp_chain(schedule, steps)
    vt = schedule.variance_type
    rows, stages, variances = [], [], []
    for i, t in enumerate(ts):
        a, s = math.sqrt(abar[i]), math.sqrt(1 - abar[i])
        last = i == len(ts) - 1
        mean = ddpm_mean(abar[i], abar_prev[i])
        pred = prediction_coeffs(schedule.prediction_type, a, s)
        if vt == "learned_range":
            variance = beta[i]  # the upper end of the learned range
            upd = dict(DV=1.0, EV=0.0 if last else 1.0, LV_MAX=math.log(beta[i]),
                       LV_MIN=math.log(post_var_clipped[i]))
        else:
            # guided-diffusion: fixed_small is the posterior variance (0 on the final step, where no noise
            # is drawn); fixed_large is beta_t, with the final step's replaced by the next posterior variance.
            variance = post_var[i] if vt == "fixed_small" else (post_var_clipped[i] if last else beta[i])
            upd = dict(D=variance, E=0.0 if last else math.sqrt(variance))
        rows.append(row(pred, a, s, **mean, **upd))
        variances.append(variance)
        stages.append(_vp_stage(schedule, i, int(t), a, s, noise=not last, variance=variance))
    return Plan("ddpm", schedule, steps, np.stack(rows), stages, init_scale=1.0,
                learned_variance=vt == "learned_range", max_variance=float(max(variances)))


def ddim(schedule: Schedule, steps: int, eta: float = 0.0, clipped: bool = False) -> Plan:
    """DDIM (Song et al. 2021 eq. 12): ``x_prev = a_prev x0^ + sqrt(1 - a_prev^2 - sig^2) eps + sig z``.

    With ``clipped`` the eps is re-derived from the clipped x0^, as guided-diffusion's ``ddim_sample``;
    that is folded into the x and x0^ columns. The mean-shift variance (x0-input guidance) is the DDPM
    posterior variance of the same step pair.
    """
    eta = check_nonneg("eta", eta)
    ts, abar, abar_prev, beta, post_var, post_var_clipped = _vp_chain(schedule, steps)
    rows, stages = [], []
    for i, t in enumerate(ts):
        a, s = math.sqrt(abar[i]), math.sqrt(1 - abar[i])
        sig = ddim_noise_std(eta, abar[i], abar_prev[i])
        # The previous step is the chain's next entry; eta > 1 would make the direction imaginary: clamp at 0.
        direction = math.sqrt(max(1 - abar_prev[i] - sig * sig, 0.0))
        pred = prediction_coeffs(schedule.prediction_type, a, s)
        upd = ddim_update(a, s, math.sqrt(abar_prev[i]), direction, clipped)
        variance = post_var[i]
        rows.append(row(pred, a, s, D=variance, E=sig, **upd))
        stages.append(_vp_stage(schedule, i, int(t), a, s, noise=sig > 0, variance=variance))
    return Plan("ddim", schedule, steps, np.stack(rows), stages, init_scale=1.0,
                max_variance=float(max(st.variance for st in stages)), options={"eta": eta})


# ---------------------------------------------------------------------------------------------------
# Sigma samplers (k-diffusion / EDM state x = x0 + sigma eps)

def sigma_schedule(schedule: Schedule, steps: int) -> tuple:
    """(sigmas with a final 0, model timesteps) for a sigma sampler."""
    if schedule.kind == "edm":
        sig = schedule.karras_sigmas(steps)
        return np.append(sig, 0.0), sig.copy()
    ts = schedule.timesteps(steps, integer=schedule.timestep_spacing != "linspace")
    sig = schedule.sigma_of_t(ts)
    if schedule.use_karras_sigmas:
        sig = schedule.karras_sigmas(steps, sigma_min=float(sig[-1]), sigma_max=float(sig[0]))
        ts = schedule.t_of_sigma(sig)
    return np.append(sig, 0.0), ts


def _sigma_stage(schedule: Schedule, i: int, sigma: float, t_model: float, **kw) -> Stage:
    """A stage on the sigma state; guidance networks see the VP view x / sqrt(1 + sigma^2)."""
    vp_in = 1.0 / math.sqrt(1.0 + sigma * sigma)
    if schedule.kind == "edm":
        tau = float(vp_time_of_sigma(sigma))
        return Stage(step=i, t_model=sigma, c_in=1.0, alpha=1.0, sigma=sigma, vp_time=tau, guide_t=tau,
                     guide_in=vp_in, **kw)
    return Stage(step=i, t_model=float(t_model), c_in=vp_in, alpha=1.0, sigma=sigma,
                 vp_time=float(t_model) / schedule.num_train_timesteps, guide_t=float(t_model),
                 guide_in=vp_in, **kw)


def _model_t(schedule: Schedule, sigma: float, t_default: float) -> float:
    """The model's timestep at a (possibly churned) sigma."""
    if schedule.kind == "edm":
        return sigma
    return t_default


def _check_churn(s_churn, s_tmin, s_tmax, s_noise) -> None:
    """EDM's stochasticity options: S_churn, S_noise finite >= 0; 0 <= S_tmin <= S_tmax (S_tmax may be inf)."""
    check_nonneg("s_churn", s_churn)
    check_nonneg("s_noise", s_noise)
    check_real("s_tmin", s_tmin, allow_inf=True)
    check_real("s_tmax", s_tmax, allow_inf=True)
    if not 0 <= s_tmin <= s_tmax:
        raise ValueError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={s_tmin!r}, s_tmax={s_tmax!r}")


def _churn(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM Algorithm 2's gamma: temporarily raise the noise level by (1 + gamma)."""
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        return min(s_churn / steps, math.sqrt(2.0) - 1.0)
    return 0.0


def _churned_stage(schedule: Schedule, i: int, steps: int, sigmas: np.ndarray, ts: np.ndarray, churn: tuple):
    """Stage 1 of an EDM step: the noise level raised to sigma_hat = sigma (1 + gamma), with the churn noise
    ``sqrt(sigma_hat^2 - sigma^2) S_noise z`` added to the state before the model sees it."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    sig = sigmas[i]
    gamma = _churn(sig, steps, s_churn, s_tmin, s_tmax)
    sig_hat = sig * (1 + gamma)
    t_model = schedule.t_of_sigma(np.array(sig_hat)).item() if gamma and schedule.kind == "vp" else ts[i]
    return _sigma_stage(schedule, i, sig_hat, _model_t(schedule, sig_hat, t_model),
                        pre_noise=math.sqrt(sig_hat ** 2 - sig ** 2) * s_noise if gamma else 0.0)


def _pred(schedule: Schedule, stage: Stage) -> dict:
    return prediction_coeffs(schedule.prediction_type, stage.alpha, stage.sigma, stage.c_in)


def _churned_schedule(schedule: Schedule, steps: int, s_churn, s_tmin, s_tmax, s_noise) -> tuple:
    """(sigmas, model timesteps, churn options) of an EDM-style sampler, its churn options checked."""
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    sigmas, ts = sigma_schedule(schedule, steps)
    return sigmas, ts, (s_churn, s_tmin, s_tmax, s_noise)


def _euler_row(schedule: Schedule, stage: Stage, sigma_to: float, **update) -> np.ndarray:
    """An Euler step from the stage's sigma to ``sigma_to`` (extra update columns, e.g. noise, in ``update``)."""
    return row(_pred(schedule, stage), 1.0, stage.sigma, **euler_update(stage.sigma, sigma_to), **update)


def euler(schedule: Schedule, steps: int, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0) -> Plan:
    """Euler on the probability-flow ODE (Karras et al. 2022 Alg. 2 without the Heun correction):
    ``x_next = x + (sigma_next - sigma_hat) (x - x0^) / sigma_hat``, with optional churn."""
    sigmas, ts, churn = _churned_schedule(schedule, steps, s_churn, s_tmin, s_tmax, s_noise)
    rows, stages = [], []
    for i in range(steps):
        st = _churned_stage(schedule, i, steps, sigmas, ts, churn)
        rows.append(_euler_row(schedule, st, sigmas[i + 1]))
        stages.append(st)
    return Plan("euler", schedule, steps, np.stack(rows), stages, init_scale=_init_scale(schedule, sigmas),
                options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))


def euler_ancestral(schedule: Schedule, steps: int, eta: float = 1.0, s_noise: float = 1.0) -> Plan:
    """Euler ancestral (k-diffusion): step deterministically to sigma_down, then add sigma_up noise, with
    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``."""
    eta, s_noise = check_nonneg("eta", eta), check_nonneg("s_noise", s_noise)
    sigmas, ts = sigma_schedule(schedule, steps)
    rows, stages = [], []
    for i in range(steps):
        sig, nxt = sigmas[i], sigmas[i + 1]
        up = min(nxt, eta * math.sqrt(nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2)) if nxt > 0 else 0.0
        down = math.sqrt(nxt ** 2 - up ** 2)
        st = _sigma_stage(schedule, i, sig, ts[i], noise=up > 0)
        rows.append(_euler_row(schedule, st, down, E=up * s_noise))
        stages.append(st)
    return Plan("euler_ancestral", schedule, steps, np.stack(rows), stages,
                init_scale=_init_scale(schedule, sigmas), options=dict(eta=eta, s_noise=s_noise))


def heun(schedule: Schedule, steps: int, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0) -> Plan:
    """Heun's 2nd-order method on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et
    al. 2022 Alg. 2), on an EDM or a VP schedule: ``2 steps - 1`` model calls.

    * EDM schedule: EDM's sampler; the model is D(x; sigma) (or its eps) at the Karras sigmas.
    * VP schedule (``Schedule.ddpm`` / ``from_diffusers``): the same method on the sigma state
      ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - alphā_t) / alphā_t)`` at the schedule's sampling
      timesteps (Karras-spaced with ``use_karras_sigmas``); the VP model sees ``x / sqrt(1 + sigma^2)`` and its
      training timestep t. This is k-diffusion's ``sample_heun`` with a VP denoiser wrapper
      (``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``) and diffusers' ``HeunDiscreteScheduler``
      (which it equals step for step when ``x_T`` is scaled alike, see the module docstring).

    Stage 1 is Euler from sigma_hat; stage 2 (skipped when sigma_next = 0, so the last step is Euler) averages
    the two slopes: ``x_next = x_hat + h (d1 + d2) / 2``, ``h = sigma_next - sigma_hat``. Stage 2's kernel
    sees x = the Euler result and x0_prev = D1, from which x_hat is recovered exactly:
    ``x_hat = (t_hat x_e + h D1) / t_next``.

    Churn (EDM's stochastic sampler; all four in sigma units on either schedule): where
    ``s_tmin <= sigma <= s_tmax`` the step starts by raising the noise level to
    ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(s_churn / steps, sqrt(2) - 1)``, adding
    ``sqrt(sigma_hat^2 - sigma^2) s_noise z`` to the state. On a VP schedule the model then gets the timestep
    of sigma_hat by interpolating log sigma over the training timesteps (diffusers' ``_sigma_to_t``,
    k-diffusion's ``sigma_to_t``), clamped to ``[0, T - 1]``: a churned first step above the schedule's
    largest sigma is given ``T - 1``, as k-diffusion does. ``s_churn = 0`` (default) is deterministic.

    Args:
        schedule: a ``Schedule`` (EDM or VP).
        steps: int >= 1, the number of noise levels (the last step goes to sigma = 0).
        s_churn: finite float >= 0, default 0 (no churn). EDM's S_churn, the total churn over the run.
        s_tmin, s_tmax: floats, ``0 <= s_tmin <= s_tmax`` (``s_tmax`` may be inf), defaults 0 and inf: the
            sigma range in which steps churn.
        s_noise: finite float >= 0, default 1. EDM's S_noise, the churn noise's scale.
    """
    sigmas, ts, churn = _churned_schedule(schedule, steps, s_churn, s_tmin, s_tmax, s_noise)
    rows, stages = [], []
    for i in range(steps):
        st = _churned_stage(schedule, i, steps, sigmas, ts, churn)
        t_hat, nxt = st.sigma, sigmas[i + 1]
        h = nxt - t_hat
        rows.append(_euler_row(schedule, st, nxt))   # stage 1: Euler from sigma_hat
        stages.append(st)
        if nxt > 0:
            r = h / t_hat
            st2 = _sigma_stage(schedule, i, nxt, _model_t(schedule, nxt, ts[i + 1] if i + 1 < len(ts) else 0.0),
                               uses_x0_prev=True, second_stage=True)
            rows.append(row(_pred(schedule, st2), 1.0, nxt,
                             A=(1 + 0.5 * r) * t_hat / nxt + 0.5 * h / nxt,
                             B=-0.5 * h / nxt,
                             F=(1 + 0.5 * r) * h / nxt - 0.5 * r))
            stages.append(st2)
    return Plan("heun", schedule, steps, np.stack(rows), stages, init_scale=_init_scale(schedule, sigmas),
                options=dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise))


def dpmpp_2m(schedule: Schedule, steps: int) -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in k-diffusion's sigma form, lambda = -log sigma:
    ``x_next = (sigma_next/sigma) x + (1 - e^{-h}) D``, D = x0^ on the first and last step, else
    ``(1 + 1/(2r)) x0^ - 1/(2r) x0^_prev`` with r = h_prev / h."""
    sigmas, ts = sigma_schedule(schedule, steps)
    rows, stages = [], []
    for i in range(steps):
        sig, nxt = sigmas[i], sigmas[i + 1]
        second = i > 0 and nxt > 0
        st = _sigma_stage(schedule, i, sig, ts[i], uses_x0_prev=second)
        ratio = nxt / sig
        if second:
            h = math.log(sig / nxt)
            r = math.log(sigmas[i - 1] / sig) / h
            upd = dict(A=ratio, B=(1 - ratio) * (1 + 0.5 / r), F=-(1 - ratio) * 0.5 / r)
        else:
            upd = dict(A=ratio, B=1 - ratio)
        rows.append(row(_pred(schedule, st), 1.0, sig, **upd))
        stages.append(st)
    return Plan("dpmpp_2m", schedule, steps, np.stack(rows), stages, init_scale=_init_scale(schedule, sigmas))


# ---------------------------------------------------------------------------------------------------
# Flow samplers (rectified flow x = (1 - s) x0 + s eps, velocity model)

def _flow_stage(schedule: Schedule, i: int, s: float, **kw) -> Stage:
    """A stage at the flow noise level s: the model and the guidance networks see the state itself and the
    timestep ``s * T``; the VP time of the discriminator windows is s."""
    t = float(s) * schedule.num_train_timesteps
    return Stage(step=i, t_model=t, c_in=1.0, alpha=1.0 - float(s), sigma=float(s), vp_time=float(s), guide_t=t,
                 guide_in=1.0, **kw)


def _flow_row(stage: Stage, **update) -> tuple:
    """(row, stage) of a flow stage: x0^ = x - s v, the flow state's score columns, the update columns, and in
    the mean-shift column D the move a score correction makes (``score_shift``), so an x0^ classifier's
    gradient (which the loop passes as the mean shift) enters as a score correction: ``v -= s/(1-s) g``."""
    r = row(prediction_coeffs("flow_prediction", stage.alpha, stage.sigma, with_eps=False), stage.alpha,
            stage.sigma, **update)
    r[Col.D] = score_shift(r)
    return r, replace(stage, variance=float(r[Col.D]))


def _flow_plan(name: str, schedule: Schedule, steps: int, rows: list, stages: list) -> Plan:
    return Plan(name, schedule, steps, np.stack(rows), stages, init_scale=1.0,
                max_variance=float(max(st.variance for st in stages)))


def flow_euler(schedule: Schedule, steps: int) -> Plan:
    """Euler on the flow ODE: ``x_next = x + (s_next - s) v = x + (s_next - s) (x - x0^) / s``, from s = 1
    (``x_T`` as it is) down to 0: diffusers' ``FlowMatchEulerDiscreteScheduler`` loop."""
    sig = np.append(schedule.flow_sigmas(steps), 0.0)
    rows, stages = [], []
    for i in range(steps):
        r, st = _flow_row(_flow_stage(schedule, i, sig[i]), **euler_update(sig[i], sig[i + 1]))
        rows.append(r)
        stages.append(st)
    return _flow_plan("euler", schedule, steps, rows, stages)


def flow_heun(schedule: Schedule, steps: int) -> Plan:
    """Heun on the flow ODE, ``2 steps - 1`` model calls: ``x_e = x + h v1``, ``x_next = x + h (v1 + v2) / 2``
    with ``v2 = v(x_e, s_next)``, ``h = s_next - s``; the step to s = 0 is Euler (diffusers'
    ``FlowMatchHeunDiscreteScheduler``). Stage 2 sees x = x_e and x0_prev = x0^_1 = x - s v1:
    ``x_next = x_e + h / (2 s_next) (x0^_1 - x0^_2)``."""
    sig = np.append(schedule.flow_sigmas(steps), 0.0)
    rows, stages = [], []
    for i in range(steps):
        s, nxt = sig[i], sig[i + 1]
        r, st = _flow_row(_flow_stage(schedule, i, s), **euler_update(s, nxt))
        rows.append(r)
        stages.append(st)
        if nxt > 0:
            h = nxt - s
            r, st = _flow_row(_flow_stage(schedule, i, nxt, uses_x0_prev=True, second_stage=True),
                              A=1.0, B=-0.5 * h / nxt, F=0.5 * h / nxt)
            rows.append(r)
            stages.append(st)
    return _flow_plan("heun", schedule, steps, rows, stages)


# ---------------------------------------------------------------------------------------------------
# CFG++ rows (Chung et al. 2024)

CFG_PP_SAMPLERS = ("euler", "euler_ancestral")


def cfg_pp_rows(plan: Plan, rows: np.ndarray, active) -> np.ndarray:
    """A copy of ``rows`` (``plan``'s, possibly already adjusted) where each stage k with ``active[k]`` takes
    CFG++'s update: the Euler update ``A x + B x0^`` rewritten with ``x = alpha x0^ + sigma eps~`` as
    ``(A alpha + B) x0^ + A sigma eps~``, equal to it whenever eps~ and x0^ come from one prediction, and
    CFG++ once the kernel takes eps~ from the uncond prediction (``StepArgs.eps_from_uncond``). On the sigma
    state (alpha = 1) that is ``A = 0, B = 1, C = sigma_next`` (``sigma_down`` on ``euler_ancestral``, whose
    noise column stays): ComfyUI's ``x = denoised + d sigma_next`` with ``d = to_d(x, sigma, uncond_denoised)``.
    The score-correction columns are untouched: a gradient moves the result as it moves the Euler step's.
    Samplers other than ``CFG_PP_SAMPLERS`` (``ValueError`` naming ``sampler``) and flow schedules (where
    ComfyUI's ``to_d`` form and the paper's DDIM form of CFG++ differ) are refused."""
    if plan.sampler not in CFG_PP_SAMPLERS:
        raise ValueError(f"CFGPlusPlus runs with sampler='euler' or 'euler_ancestral' (CFG++ renoises an Euler "
                         f"step with the unconditional eps), not sampler={plan.sampler!r}")
    if plan.schedule.kind == "flow":
        raise ValueError("CFGPlusPlus runs on EDM and VP schedules (the sigma state x = x0 + sigma eps), not on "
                         "a flow schedule (Schedule.flow)")
    out = np.array(rows, dtype=np.float64, copy=True)
    for k, st in enumerate(plan.stages):
        if active[k]:
            r = out[k]
            a = r[Col.A]
            r[Col.B] = a * st.alpha + r[Col.B]
            r[Col.C] = a * st.sigma
            r[Col.A] = 0.0
    return out


def _init_scale(schedule: Schedule, sigmas: np.ndarray) -> float:
    """Unit noise becomes x_T: sigma_max for EDM, sqrt(1 + sigma_max^2) for a VP model in sigma state."""
    return float(sigmas[0]) if schedule.kind == "edm" else math.sqrt(1.0 + float(sigmas[0]) ** 2)


_BUILDERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun,
             "dpmpp_2m": dpmpp_2m}
_FLOW_BUILDERS = {"euler": flow_euler, "heun": flow_heun}


def build(sampler: str, schedule: Schedule, steps: int, **options) -> Plan:
    """The plan of ``sampler`` over ``steps`` steps of ``schedule``: its coefficient rows and stages.

    Args:
        sampler: ``"ddpm"``, ``"ddim"`` (VP schedules only), ``"euler"``, ``"euler_ancestral"``, ``"heun"``,
            ``"dpmpp_2m"`` (any schedule: EDM, or a VP schedule run in the sigma state ``x = x0 + sigma eps``,
            the VP model seeing ``x / sqrt(1 + sigma^2)`` and its training timestep; ``heun`` on VP is
            k-diffusion's ``sample_heun`` with a VP denoiser wrapper and diffusers' ``HeunDiscreteScheduler``).
            On a flow schedule (``Schedule.flow``) only ``"euler"`` and ``"heun"``, on the flow ODE
            (``flow_euler`` / ``flow_heun``), and they take no options.
        schedule: a ``fastguide.Schedule``.
        steps: int >= 1, the number of sampling steps (at most the training steps for a VP schedule).
        **options: the sampler's own keywords: ``ddim``: ``eta`` (default 0), ``clipped``; ``euler`` and
            ``heun``: ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``; ``euler_ancestral``: ``eta`` (default 1),
            ``s_noise``. An option the sampler does not take is a ``TypeError`` naming it.

    Returns a ``Plan``; ``plan.table`` is the fp32 ``[stages, NUM_COLS]`` host tensor ``fastguide.guided_step``
    reads (move it to the sample's device once: ``plan.table.to(device)``).

    >>> plan = fastguide.samplers.build("heun", fastguide.Schedule.edm(), steps=18, s_churn=0.0)
    >>> plan.table.shape      # 35 stages: 18 Euler stages + 17 Heun corrections
    torch.Size([35, 19])
    >>> vp = fastguide.samplers.build("heun", fastguide.Schedule.ddpm(timestep_spacing="trailing"), steps=10)
    """
    if sampler not in _BUILDERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastguide.Schedule, got {type(schedule).__name__}")
    if schedule.kind == "flow" and sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} does not run on a flow schedule (Schedule.flow); use one of "
                         f"{FLOW_SAMPLERS}")
    if sampler in VP_SAMPLERS and schedule.kind != "vp":
        raise ValueError(f"sampler {sampler!r} needs a VP schedule (Schedule.ddpm), got an EDM schedule")
    check_int("steps", steps, minimum=1)
    builder = _FLOW_BUILDERS[sampler] if schedule.kind == "flow" else _BUILDERS[sampler]
    try:
        inspect.signature(builder).bind(schedule, steps, **options)
    except TypeError as exc:
        raise TypeError(f"sampler {sampler!r}: {exc}") from None
    return builder(schedule, steps, **options)


def with_rows(plan: Plan, rows: np.ndarray) -> Plan:
    """A copy of ``plan`` with another coefficient table (same stages)."""
    return replace(plan, rows=rows)
