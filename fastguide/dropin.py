"""Drop-in replacement for ``scheduler.step`` of diffusers schedulers, with the CFG combine fused in.

``fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=w)`` returns what
``scheduler.step(u + w * (c - u), t, latents)`` of the diffusers scheduler returns, and advances the
scheduler's step state the same way, so a pipeline may switch between the two mid-loop.

How: every supported scheduler step is one row of ``fastguide.layout`` coefficients. The rows are built
here, in float64, from the scheduler's *own* state after ``set_timesteps`` (``alphas_cumprod``,
``timesteps``, ``sigmas``: spacing, Karras sigmas, zero-SNR rescaling and custom schedules are already in
them), once per schedule, and kept as a device table. A call looks up its row on the host (the timestep's
position for DDPM/DDIM, the scheduler's step counter for the others) and runs one fused
``fastguide.guided_step``. Stochastic schedulers draw their noise from the caller's generator exactly where,
and in the shape and dtype, diffusers draws it, so seeded loops match sample for sample.

Supported: ``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 1 or 2).
Anything else raises ``ValueError`` naming the scheduler or the option.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import dispatch as _dispatch
from . import dropin_guidance as _dropin_guidance
from . import noise as _noise
from . import ops as _ops
from .layout import NUM_COLS, Col

__all__ = ["step", "StepOutput", "SchedulerPlan", "plan_for", "prepare"]

Scale = Union[float, int, torch.Tensor]
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]

_DDPM, _DDIM, _EULER, _EULER_A, _DPM = "ddpm", "ddim", "euler", "euler_ancestral", "dpmsolver++"

# diffusers class name -> the step formula it uses.
_KINDS = {
    "DDPMScheduler": _DDPM,
    "DDIMScheduler": _DDIM,
    "EulerDiscreteScheduler": _EULER,
    "EulerAncestralDiscreteScheduler": _EULER_A,
    "DPMSolverMultistepScheduler": _DPM,
}
_INDEX_BASED = (_EULER, _EULER_A, _DPM)  # schedulers that keep a step counter (``_step_index``)


@dataclass
class StepOutput:
    """What ``fastguide.step(..., return_dict=True)`` returns (the fields of diffusers' step outputs)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass
class SchedulerPlan:
    """The coefficient rows of one scheduler's current schedule, and what each step needs to know.

    ``rows`` holds ``num_steps`` rows (one per position in ``scheduler.timesteps``); DPM-Solver++ with
    ``solver_order=2`` appends ``num_steps`` second-order rows (row ``num_steps + i`` is step ``i`` taken with
    the previous x0). Per step, ``alpha``/``sigma`` give the state's parametrisation ``x = alpha x0 + sigma
    eps`` (for Euler that is the sigma after churn), which defines the score-correction columns
    (``eps -= sigma g``, ``x0 += sigma^2/alpha g``). ``variance`` is DDPM's fixed mean-shift variance
    (``mu += Sigma g``); None where the model supplies it (learned_range: the DV column) or the scheduler has
    no mean shift.
    """

    kind: str
    rows: np.ndarray                       # [R, NUM_COLS] float64
    num_steps: int
    alpha: np.ndarray                      # [num_steps]
    sigma: np.ndarray                      # [num_steps]
    draws_noise: np.ndarray                # [num_steps] bool: diffusers draws noise on this step
    variance: Optional[np.ndarray] = None  # [num_steps] DDPM fixed variance for a mean shift
    learned_variance: bool = False         # model output carries 2C channels (DDPM learned_range)
    timestep_rows: Dict[int, int] = field(default_factory=dict)  # DDPM/DDIM: timestep value -> step
    _tables: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Python bools for compiled code (dynamo turns numpy reads into tensor ops it cannot branch on).
        self.noise_steps: Tuple[bool, ...] = tuple(bool(v) for v in self.draws_noise)
        self.any_noise: bool = any(self.noise_steps)

    @property
    def supports_mean_shift(self) -> bool:
        return self.kind == _DDPM

    def table(self, device: torch.device) -> torch.Tensor:
        """The fp32 table on ``device``, copied there once."""
        t = self._tables.get(device)
        if t is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(_PREPARE_HELP)
            t = torch.from_numpy(self.rows).to(device=device, dtype=torch.float32)
            self._tables[device] = t
        return t

    def timestep_values(self, device: torch.device) -> torch.Tensor:
        """DDPM/DDIM: int64 ``[num_steps]`` of the timestep each row belongs to, on ``device`` (copied once);
        compiled code finds a timestep's row on the device with it instead of reading the timestep."""
        key = ("timesteps", device)
        t = self._tables.get(key)
        if t is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(_PREPARE_HELP)
            ts = np.zeros(self.num_steps, dtype=np.int64)
            for value, row in self.timestep_rows.items():
                ts[row] = value
            t = self._tables[key] = torch.from_numpy(ts).to(device)
        return t

    def row_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The row of a timestep tensor as a 0-dim int64 tensor on the timestep's device, found without a
        host read (the first position holding it, as the host lookup takes). A timestep that is not in the
        schedule is not detected here: that would need a sync."""
        values = self.timestep_values(timestep.device)
        return (values == timestep.reshape(())).to(torch.int64).argmax()


# ---------------------------------------------------------------------------------------------------
# Which scheduler, and which of its options we can express


def _kind_of(scheduler) -> str:
    """The step formula of ``scheduler``; subclasses count only if they keep the parent's ``step``."""
    for cls in type(scheduler).__mro__:
        kind = _KINDS.get(cls.__name__)
        if kind is not None and getattr(type(scheduler), "step", None) is getattr(cls, "step", None):
            return kind
    raise ValueError(f"scheduler: {type(scheduler).__name__} is not supported by fastguide.step; supported: "
                     f"{', '.join(_KINDS)}")


def _cfg(scheduler, name: str, default=None):
    return scheduler.config.get(name, default)


def _check_choice(scheduler, name: str, allowed: Tuple) -> None:
    value = _cfg(scheduler, name)
    if value not in allowed:
        raise ValueError(f"scheduler.config.{name}={value!r} is not supported by fastguide.step for "
                         f"{type(scheduler).__name__} (supported: {', '.join(map(repr, allowed))})")


def _check_config(scheduler, kind: str) -> None:
    """Reject every config option whose step the coefficient rows cannot reproduce."""
    if kind == _DDPM:
        _check_choice(scheduler, "prediction_type", ("epsilon", "v_prediction", "sample"))
        if _cfg(scheduler, "variance_type") == "fixed_large_log":
            # DDPMScheduler.step takes sqrt(log beta_t) for this type, so its own result is NaN.
            raise ValueError("scheduler.config.variance_type='fixed_large_log' is not supported: diffusers' "
                             "DDPMScheduler.step returns NaN for it (it takes the square root of log beta_t); "
                             "'fixed_large' is the intended variance")
        # None behaves as fixed_small in DDPMScheduler.step.
        _check_choice(scheduler, "variance_type", (None, "fixed_small", "fixed_small_log", "fixed_large",
                                                   "learned_range"))
    elif kind == _DDIM:
        _check_choice(scheduler, "prediction_type", ("epsilon", "v_prediction", "sample"))
    elif kind == _EULER:
        _check_choice(scheduler, "prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"))
    elif kind == _EULER_A:
        _check_choice(scheduler, "prediction_type", ("epsilon", "v_prediction"))
    elif kind == _DPM:
        _check_choice(scheduler, "algorithm_type", ("dpmsolver++",))
        _check_choice(scheduler, "solver_order", (1, 2))
        _check_choice(scheduler, "solver_type", ("midpoint", "heun"))
        _check_choice(scheduler, "prediction_type", ("epsilon", "v_prediction", "sample"))
        _check_choice(scheduler, "variance_type", (None,))
        if _cfg(scheduler, "use_flow_sigmas", False):
            raise ValueError("scheduler.config.use_flow_sigmas=True is not supported by fastguide.step")
    if kind in (_DDPM, _DDIM, _DPM) and _cfg(scheduler, "thresholding", False):
        ratio = _cfg(scheduler, "dynamic_thresholding_ratio")
        if not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"scheduler.config.dynamic_thresholding_ratio must be in [0, 1], got {ratio!r}")
    elif kind in (_DDPM, _DDIM) and _cfg(scheduler, "clip_sample", False):
        rng = _cfg(scheduler, "clip_sample_range", 1.0)
        if not isinstance(rng, numbers.Real) or not float(rng) > 0.0 or not math.isfinite(float(rng)):
            raise ValueError(f"scheduler.config.clip_sample_range must be a finite float > 0, got {rng!r}")
    if kind in (_DDIM, _DPM) and getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"scheduler: {type(scheduler).__name__} has no schedule yet; call "
                         "scheduler.set_timesteps(...) first")


# ---------------------------------------------------------------------------------------------------
# Coefficient rows, float64, from the scheduler's own arrays


def _f64(t) -> np.ndarray:
    return np.asarray(t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)


def _score_cols(r: np.ndarray, alpha: float, sigma: float) -> None:
    """Score correction for a state x = alpha x0 + sigma eps: eps -= sigma g, so x0 += sigma^2/alpha g."""
    r[Col.Q_G] = -sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        r[Col.P_G] = np.float64(sigma) * sigma / np.float64(alpha)


def _vp_prediction(r: np.ndarray, prediction_type: str, a: float, s: float, with_eps: bool) -> None:
    """x0 (and eps when ``with_eps``) from (x, m) on the VP state x = a x0 + s eps (raw, before clipping)."""
    a, s = np.float64(a), np.float64(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction_type == "epsilon":
            r[Col.P_X], r[Col.P_M] = 1.0 / a, -s / a
            if with_eps:
                r[Col.Q_M] = 1.0
        elif prediction_type == "sample":
            r[Col.P_M] = 1.0
            if with_eps:
                r[Col.Q_X], r[Col.Q_M] = 1.0 / s, -a / s
        else:  # v_prediction (Salimans & Ho 2022): v = a eps - s x0
            r[Col.P_X], r[Col.P_M] = a, -s
            if with_eps:
                r[Col.Q_X], r[Col.Q_M] = s, a


def _ddpm_plan(scheduler) -> SchedulerPlan:
    """Ho et al. 2020 eq. 7 over diffusers' chain: x_prev = c0 x0^ + ct x + std z, noise only when t > 0."""
    abar = _f64(scheduler.alphas_cumprod)
    ts = [int(t) for t in _f64(scheduler.timesteps)]
    n = len(ts)
    pred = _cfg(scheduler, "prediction_type")
    vtype = _cfg(scheduler, "variance_type")
    learned = vtype == "learned_range"
    rows = np.zeros((n, NUM_COLS))
    alpha, sigma, variance = np.zeros(n), np.zeros(n), np.zeros(n)
    draws = np.zeros(n, dtype=bool)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < n else -1
        at = abar[t]
        ap = abar[prev] if prev >= 0 else 1.0
        beta = 1.0 - at / ap
        post_var = max((1.0 - ap) / (1.0 - at) * beta, 1e-20)  # clamped as diffusers does
        a, s = math.sqrt(at), math.sqrt(1.0 - at)
        r = rows[i]
        _vp_prediction(r, pred, a, s, with_eps=False)
        r[Col.B] = math.sqrt(ap) * beta / (1.0 - at)
        r[Col.A] = math.sqrt(at / ap) * (1.0 - ap) / (1.0 - at)
        _score_cols(r, a, s)
        draws[i] = t > 0
        if learned:
            # log Sigma = f log beta_t + (1 - f) log(posterior variance), f = (v + 1) / 2; noise sqrt(Sigma).
            with np.errstate(divide="ignore"):
                r[Col.LV_MAX], r[Col.LV_MIN] = np.log(beta), np.log(post_var)
            r[Col.DV] = 1.0
            r[Col.EV] = 1.0 if draws[i] else 0.0
            variance[i] = np.nan
        else:
            var = beta if vtype == "fixed_large" else post_var  # fixed_small_log: same std, via exp(log/2)
            r[Col.D] = var
            r[Col.E] = math.sqrt(var) if draws[i] else 0.0
            variance[i] = var
        alpha[i], sigma[i] = a, s
    return SchedulerPlan(_DDPM, rows, n, alpha, sigma, draws, None if learned else variance, learned,
                         _first_positions(ts))


def _ddim_plan(scheduler, eta: float, use_clipped: bool) -> SchedulerPlan:
    """Song et al. 2021 eq. 12 as DDIMScheduler takes it: the previous timestep is always
    ``t - num_train_timesteps // num_inference_steps`` (not the next entry of the schedule)."""
    abar = _f64(scheduler.alphas_cumprod)
    final = float(_f64(scheduler.final_alpha_cumprod))
    ts = [int(t) for t in _f64(scheduler.timesteps)]
    n = len(ts)
    stride = int(_cfg(scheduler, "num_train_timesteps")) // int(scheduler.num_inference_steps)
    pred = _cfg(scheduler, "prediction_type")
    rows = np.zeros((n, NUM_COLS))
    alpha, sigma = np.zeros(n), np.zeros(n)
    for i, t in enumerate(ts):
        prev = t - stride
        at = abar[t]
        ap = abar[prev] if prev >= 0 else final
        a, s, a_prev = math.sqrt(at), math.sqrt(1.0 - at), math.sqrt(ap)
        std = eta * math.sqrt((1.0 - ap) / (1.0 - at) * (1.0 - at / ap))
        rest = 1.0 - ap - std * std
        # eta > 1 can make this negative; diffusers then returns NaN, and so does the row.
        direction = math.sqrt(rest) if rest >= 0 else math.nan
        r = rows[i]
        _vp_prediction(r, pred, a, s, with_eps=not use_clipped)
        if use_clipped:
            # eps re-derived from the clipped x0^: direction * (x - a x0^) / s, folded into A and B.
            r[Col.A], r[Col.B] = direction / s, a_prev - direction * a / s
        else:
            r[Col.B], r[Col.C] = a_prev, direction
        r[Col.E] = std if eta > 0 else 0.0
        _score_cols(r, a, s)
        alpha[i], sigma[i] = a, s
    draws = np.full(n, eta > 0)
    return SchedulerPlan(_DDIM, rows, n, alpha, sigma, draws, timestep_rows=_first_positions(ts))


def _first_positions(ts: List[int]) -> Dict[int, int]:
    positions: Dict[int, int] = {}
    for i, t in enumerate(ts):
        positions.setdefault(t, i)
    return positions


def _sigma_prediction(prediction_type: str, sigma_in: float, sigma_hat: float) -> Tuple[float, float]:
    """(P_X, P_M) for Euler's x0 on the state x = x0 + sigma eps; v uses the un-churned sigma as diffusers."""
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type in ("sample", "original_sample"):
        return 0.0, 1.0
    return 1.0 / (sigma_in * sigma_in + 1.0), -sigma_in / math.sqrt(sigma_in * sigma_in + 1.0)


def _euler_plan(scheduler, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SchedulerPlan:
    """Euler on the probability-flow ODE with EDM churn (Karras et al. 2022 Alg. 2) as EulerDiscreteScheduler:
    x' = x + s_noise sqrt(sh^2 - s^2) z, x_next = x' + (s_next - sh) (x' - x0^) / sh, sh = s (1 + gamma)."""
    sig = _f64(scheduler.sigmas)
    n = len(sig) - 1
    pred = _cfg(scheduler, "prediction_type")
    # diffusers compares a float32 sigma with the bounds, so compare in float32 too.
    tmin32, tmax32 = np.float32(s_tmin), np.float32(s_tmax)
    rows = np.zeros((n, NUM_COLS))
    alpha, sigma = np.ones(n), np.zeros(n)
    draws = np.zeros(n, dtype=bool)
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if tmin32 <= np.float32(s) <= tmax32 else 0.0
        sh = s * (gamma + 1.0)
        churn = s_noise * math.sqrt(sh * sh - s * s) if gamma > 0 else 0.0
        px, pm = _sigma_prediction(pred, s, sh)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.float64(nxt - sh) / np.float64(sh)
        r = rows[i]
        r[Col.P_X], r[Col.P_M], r[Col.P_Z] = px, pm, px * churn
        r[Col.A], r[Col.B], r[Col.E] = 1.0 + ratio, -ratio, (1.0 + ratio) * churn
        _score_cols(r, 1.0, sh)
        draws[i] = gamma > 0
        sigma[i] = sh
    return SchedulerPlan(_EULER, rows, n, alpha, sigma, draws)


def _euler_ancestral_plan(scheduler) -> SchedulerPlan:
    """Euler ancestral: step to sigma_down, add sigma_up noise (drawn on every step, even when 0)."""
    sig = _f64(scheduler.sigmas)
    n = len(sig) - 1
    pred = _cfg(scheduler, "prediction_type")
    rows = np.zeros((n, NUM_COLS))
    alpha, sigma = np.ones(n), np.zeros(n)
    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        up = math.sqrt(nxt * nxt * (s * s - nxt * nxt) / (s * s))
        down = math.sqrt(nxt * nxt - up * up)
        px, pm = _sigma_prediction(pred, s, s)
        ratio = (down - s) / s
        r = rows[i]
        r[Col.P_X], r[Col.P_M] = px, pm
        r[Col.A], r[Col.B], r[Col.E] = 1.0 + ratio, -ratio, up
        _score_cols(r, 1.0, s)
        sigma[i] = s
    return SchedulerPlan(_EULER_A, rows, n, alpha, sigma, np.ones(n, dtype=bool))


def _dpm_lower_order_final(scheduler, i: int, n: int) -> bool:
    """DPMSolverMultistepScheduler falls back to first order on the last step under these settings."""
    return i == n - 1 and bool(_cfg(scheduler, "euler_at_final") or
                               (_cfg(scheduler, "lower_order_final") and n < 15) or
                               _cfg(scheduler, "final_sigmas_type") == "zero")


def _dpm_plan(scheduler) -> SchedulerPlan:
    """DPM-Solver++ (Lu et al. 2022) 1S and 2M on the VP state, with alpha = 1/sqrt(1+sigma^2),
    sigma_vp = sigma alpha, so exp(-h) = sigma_next / sigma (no log of a zero final sigma needed)."""
    sig = _f64(scheduler.sigmas)
    n = len(scheduler.timesteps)
    pred = _cfg(scheduler, "prediction_type")
    order = int(_cfg(scheduler, "solver_order"))
    heun = _cfg(scheduler, "solver_type") == "heun"
    rows = np.zeros((n * order, NUM_COLS))
    alpha, sigma = np.zeros(n), np.zeros(n)

    def vp(x: float) -> Tuple[float, float]:
        a = 1.0 / math.sqrt(x * x + 1.0)
        return a, x * a

    for i in range(n):
        s, nxt = sig[i], sig[i + 1]
        a_s, s_s = vp(s)
        a_n, s_n = vp(nxt)
        decay = nxt / s  # exp(-h)
        first = rows[i]
        _vp_prediction(first, pred, a_s, s_s, with_eps=False)
        _score_cols(first, a_s, s_s)
        first[Col.A], first[Col.B] = s_n / s_s, a_n * (1.0 - decay)
        alpha[i], sigma[i] = a_s, s_s
        if order == 2:
            second = rows[n + i]
            second[:] = first
            if i > 0 and nxt > 0 and not _dpm_lower_order_final(scheduler, i, n):
                # A repeated sigma (h = 0 or h_prev = 0) makes this non-finite, as in diffusers' own step.
                with np.errstate(divide="ignore", invalid="ignore"):
                    h = np.log(np.float64(s) / nxt)
                    r0 = np.log(np.float64(sig[i - 1]) / s) / h
                    d1 = a_n * ((decay - 1.0) / h + 1.0) / r0 if heun else 0.5 * a_n * (1.0 - decay) / r0
                # x_next = A x + a_n (1 - e^-h) x0 + d1 (x0 - x0_prev), the D1 term of the 2M update.
                second[Col.B] = a_n * (1.0 - decay) + d1
                second[Col.F] = -d1
    return SchedulerPlan(_DPM, rows, n, alpha, sigma, np.zeros(n, dtype=bool))


# ---------------------------------------------------------------------------------------------------
# Per-scheduler cache: rebuilt when set_timesteps (or a config change) replaces the scheduler's arrays


@dataclass
class _SchedulerState:
    """What fastguide knows about one scheduler's current schedule and config (validated once)."""

    refs: tuple                               # the objects it was built from, compared by identity
    kind: str
    clip: Optional[Tuple[float, float]]       # clip_sample range, DDPM/DDIM
    threshold: Optional[Tuple[float, float]]  # (dynamic_thresholding_ratio, sample_max_value)
    solver_order: int = 1                     # DPM-Solver++
    plans: Dict[tuple, SchedulerPlan] = field(default_factory=dict)
    # Index-based schedulers: the step index of the next call. Compiled calls read it instead of the
    # scheduler's ``_step_index`` (None before the first step, and an int that dynamo specialises on when the
    # scheduler is a global: one graph per step, then a hard failure at the recompile limit with
    # fullgraph=True). Dynamo traces this attribute as a symbolic integer (see _STEP_COUNTER_SOURCE).
    next_index: int = 0


# The cached state lives on the scheduler object itself: it dies with it, copies carry it along, and
# torch.compile guards on a plain attribute (a module-level WeakKeyDictionary made dynamo guard on the
# position of entries that garbage collection may remove, which broke guard building).
_STATE_ATTR = "_fastguide_state"

# Compiled code cannot build coefficient tables (numpy) or read the scheduler's timestep tensors on the host.
_PREPARE_HELP = ("fastguide.step inside torch.compile needs the scheduler's tables built beforehand: call "
                 "fastguide.dropin.prepare(scheduler, device, **step_options) after scheduler.set_timesteps(...) "
                 "and outside the compiled function (or run one fastguide.step eagerly first)")
_KIND_OF_TYPE: Dict[type, str] = {}

# Dynamo specialises on integers read from globals (and on a first trace, on every integer), so a step
# counter would compile one graph per step. torch.compile's ``dynamic_sources`` marks sources by name as
# symbolic; fastguide adds the name of its own counter (and nothing else) to it, keeping the user's entries.
_STEP_COUNTER_SOURCE = rf".*\.{_STATE_ATTR}\.next_index$"


def _mark_step_counter_dynamic() -> None:
    current = torch.compiler.config.dynamic_sources
    if _STEP_COUNTER_SOURCE not in current.split(","):
        torch.compiler.config.dynamic_sources = f"{current},{_STEP_COUNTER_SOURCE}" if current else \
            _STEP_COUNTER_SOURCE


_mark_step_counter_dynamic()


def _state_refs(scheduler, kind: str) -> tuple:
    """set_timesteps assigns new ``timesteps``/``sigmas`` tensors and a config change a new config object;
    holding them makes identity a safe key."""
    arrays = (scheduler.sigmas,) if kind in _INDEX_BASED else (scheduler.alphas_cumprod,)
    return (scheduler.timesteps, scheduler.config) + arrays


def _scheduler_state(scheduler) -> _SchedulerState:
    """The cached state of ``scheduler``, rebuilt (and its config re-validated) when its arrays changed."""
    kind = _KIND_OF_TYPE.get(type(scheduler))
    if kind is None:
        kind = _KIND_OF_TYPE[type(scheduler)] = _kind_of(scheduler)
    refs = _state_refs(scheduler, kind)
    state = getattr(scheduler, _STATE_ATTR, None)
    if state is not None and len(state.refs) == len(refs) and all(a is b for a, b in zip(state.refs, refs)):
        return state
    if torch.compiler.is_compiling():
        raise RuntimeError(_PREPARE_HELP)
    _check_config(scheduler, kind)
    clip = threshold = None
    if kind in (_DDPM, _DDIM, _DPM) and _cfg(scheduler, "thresholding", False):
        threshold = (float(_cfg(scheduler, "dynamic_thresholding_ratio")), float(_cfg(scheduler, "sample_max_value")))
    elif kind in (_DDPM, _DDIM) and _cfg(scheduler, "clip_sample", False):
        r = float(_cfg(scheduler, "clip_sample_range", 1.0))
        clip = (-r, r)
    order = int(_cfg(scheduler, "solver_order")) if kind == _DPM else 1
    state = _SchedulerState(refs, kind, clip, threshold, order)
    setattr(scheduler, _STATE_ATTR, state)
    return state


def plan_for(scheduler, *, eta: float = 0.0, use_clipped_model_output: bool = False, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> SchedulerPlan:
    """The coefficient plan of ``scheduler``'s current schedule for these step options (cached).

    >>> plan = fastguide.dropin.plan_for(scheduler)     # after scheduler.set_timesteps(...)
    >>> plan.sigma[i], plan.variance[i]                 # state parametrisation / DDPM variance of step i
    """
    state = _scheduler_state(scheduler)
    return _plan(scheduler, state, _variant(state.kind, eta, use_clipped_model_output, s_churn, s_tmin, s_tmax,
                                            s_noise))


def prepare(scheduler, device: Union[None, str, torch.device] = None, **step_options) -> SchedulerPlan:
    """Build and cache everything ``fastguide.step`` needs for ``scheduler``'s current schedule on ``device``
    (default: where ``scheduler.timesteps`` lives), so that ``fastguide.step`` runs inside
    ``torch.compile(fullgraph=True)`` without graph breaks. ``step_options`` are the step's scheduler options
    (``eta``, ``use_clipped_model_output``, ``s_churn``, ...). Call it after ``set_timesteps`` (and
    ``set_begin_index``, if any) and outside the compiled function, once per sampling loop: it also sets the
    step counter that compiled calls of index-based schedulers read, and probes the kernel backends (an import
    cannot be traced). An eager ``fastguide.step`` call prepares the same way.

    >>> scheduler.set_timesteps(50)
    >>> fastguide.dropin.prepare(scheduler, "cuda")
    >>> denoise = torch.compile(lambda x, t: fastguide.step(unet(torch.cat([x] * 2), t), t, x,
    ...                                                      scheduler=scheduler, guidance_scale=7.5),
    ...                         fullgraph=True)
    """
    plan = plan_for(scheduler, **step_options)
    if plan.kind in _INDEX_BASED:
        start = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        _scheduler_state(scheduler).next_index = int(start or 0)
    _dispatch.backends()  # probe the backends now: importing one is not traceable
    devices = {torch.device(device) if device is not None else scheduler.timesteps.device,
               scheduler.timesteps.device}
    for d in devices:
        plan.table(d)
        if plan.kind in (_DDPM, _DDIM):
            plan.timestep_values(d)
    return plan


def _variant(kind: str, eta, use_clipped, s_churn, s_tmin, s_tmax, s_noise) -> tuple:
    if kind == _DDIM:
        return (float(eta), bool(use_clipped))
    if kind == _EULER:
        return (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
    return ()


def _plan(scheduler, state: _SchedulerState, variant: tuple) -> SchedulerPlan:
    plan = state.plans.get(variant)
    if plan is None:
        if torch.compiler.is_compiling():
            raise RuntimeError(_PREPARE_HELP)
        kind = state.kind
        if kind == _DDPM:
            plan = _ddpm_plan(scheduler)
        elif kind == _DDIM:
            plan = _ddim_plan(scheduler, *variant)
        elif kind == _EULER:
            plan = _euler_plan(scheduler, *variant)
        elif kind == _EULER_A:
            plan = _euler_ancestral_plan(scheduler)
        else:
            plan = _dpm_plan(scheduler)
        state.plans[variant] = plan
    return plan


# ---------------------------------------------------------------------------------------------------
# Argument checks (all before anything is drawn, written or advanced)


def _check_real(name: str, value, *, minimum: Optional[float] = None, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or (minimum is not None and v < minimum):
        what = "a float" if minimum is None else f"a float >= {minimum}"
        raise ValueError(f"{name} must be {what}{'' if allow_inf else ' and finite'}, got {value!r}")
    return v


def _scalar_timestep(timestep) -> float:
    """The timestep as a host number (one sync for a CUDA tensor, as diffusers' own indexing does).

    ``tolist`` reads a CPU tensor's memory directly, where ``item`` would dispatch an op on every step."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a scalar, got a tensor of shape {tuple(timestep.shape)}")
        value = timestep.tolist()
        while isinstance(value, list):
            value = value[0]
        return value
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be an int, a float or a one-element tensor, got {type(timestep).__name__}")
    return timestep


def _vp_row(plan: SchedulerPlan, timestep) -> int:
    value = _scalar_timestep(timestep)
    row = plan.timestep_rows.get(int(value)) if float(value).is_integer() else None
    if row is None:
        shown = list(plan.timestep_rows)
        shown = shown if len(shown) <= 12 else shown[:6] + ["..."] + shown[-3:]
        raise ValueError(f"timestep {value!r} is not in scheduler.timesteps {shown}")
    return row


def _indexed_step(scheduler, state: _SchedulerState, timestep) -> Tuple[int, bool]:
    """(step index this call uses, whether the scheduler's counter must be initialised from ``timestep``)."""
    if state.kind in (_EULER, _EULER_A) and (isinstance(timestep, int) and not isinstance(timestep, bool) or
                                       isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        # As Euler*.step: integer indices (enumerate) are a common mistake; pass a value of scheduler.timesteps.
        raise ValueError("timestep must be a value of scheduler.timesteps, not an integer index")
    n = len(scheduler.timesteps)
    if torch.compiler.is_compiling():
        index, init = state.next_index, False   # see _SchedulerState.next_index
    elif scheduler.step_index is not None:
        index, init = int(scheduler.step_index), False
    elif scheduler.begin_index is not None:
        index, init = int(scheduler.begin_index), True
    else:
        _scalar_timestep(timestep)
        ts = timestep.to(scheduler.timesteps.device) if isinstance(timestep, torch.Tensor) else timestep
        if not bool((scheduler.timesteps == ts).any()):
            raise ValueError(f"timestep {_scalar_timestep(timestep)!r} is not in scheduler.timesteps")
        index, init = int(scheduler.index_for_timestep(ts)), True
    if not 0 <= index < n:
        raise ValueError(f"scheduler: step index {index} is past the end of its {n}-step schedule; call "
                         "scheduler.set_timesteps(...) to start a new loop")
    return index, init


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 dynamic threshold per sample: the ``ratio`` quantile of |x0|, clamped to
    [1, max_value] (computed in fp32 like diffusers, which upcasts half inputs)."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    return torch.quantile(flat, ratio, dim=1).clamp(min=1, max=max_value)


# ---------------------------------------------------------------------------------------------------
# The step


def _scheduler_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, *, scheduler,
                    guidance_scale: Optional[Scale], guidance_rescale: float, generator: GeneratorArg,
                    eta: float, use_clipped_model_output: bool, s_churn: float, s_tmin: float, s_tmax: float,
                    s_noise: float, out: Optional[torch.Tensor], backend: str, want_x0: bool,
                    g_score: Optional[torch.Tensor] = None,
                    g_mean: Optional[torch.Tensor] = None, guide=None,
                    check_finite: bool = False,
                    noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One scheduler step; returns (prev_sample, x0 or None).

    ``g_score`` (added to the score: ``eps -= sigma g``) and ``g_mean`` (DDPM mean shift ``mu += Sigma g``)
    are the hooks for classifier / discriminator guidance; callers pass gradients already scaled.
    ``guide(plan, index, predicted_x0) -> (g_score, g_mean, table or None)`` computes guidance terms once the
    row is known (``predicted_x0()`` runs the x0-only pass); see ``dropin_guidance``.
    Everything is checked before the generator, ``out`` or the scheduler is touched.
    """
    state = _scheduler_state(scheduler)
    kind = state.kind

    # Options that only some schedulers' step() takes (the common all-default call skips the checks).
    if eta != 0.0 or use_clipped_model_output is not False:
        eta = _check_real("eta", eta, minimum=0.0)
        if not isinstance(use_clipped_model_output, bool):
            raise TypeError(f"use_clipped_model_output must be a bool, got "
                            f"{type(use_clipped_model_output).__name__}")
        if kind != _DDIM and (eta != 0.0 or use_clipped_model_output):
            name = "eta" if eta != 0.0 else "use_clipped_model_output"
            raise ValueError(f"{name} applies only to DDIMScheduler, not {type(scheduler).__name__}")
    if (s_churn, s_tmin, s_tmax, s_noise) != (0.0, 0.0, math.inf, 1.0):
        s_churn = _check_real("s_churn", s_churn, minimum=0.0)
        s_tmin = _check_real("s_tmin", s_tmin, allow_inf=True)
        s_tmax = _check_real("s_tmax", s_tmax, allow_inf=True)
        s_noise = _check_real("s_noise", s_noise)
        if kind != _EULER:
            raise ValueError(f"s_churn/s_tmin/s_tmax/s_noise apply only to EulerDiscreteScheduler, not "
                             f"{type(scheduler).__name__}")

    # Tensors.
    _ops.check_tensor("sample", sample)
    if sample.dim() < 2:
        raise ValueError(f"sample must have a batch dimension and at least one more, got {tuple(sample.shape)}")
    _ops.check_tensor("model_output", model_output)
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    if model_output.dtype != sample.dtype:
        raise TypeError(f"model_output has dtype {model_output.dtype} but sample has {sample.dtype}; "
                        "pass both in the same dtype")
    batch = sample.shape[0]
    rows = 2 * batch if guidance_scale is not None else batch
    if model_output.shape[0] != rows:
        what = ("2B rows [uncond; cond] because guidance_scale is given" if guidance_scale is not None
                else "B rows because no guidance_scale is given")
        raise ValueError(f"model_output must have {what}: sample has B={batch}, model_output has "
                         f"{model_output.shape[0]} rows")
    learned = kind == _DDPM and _cfg(scheduler, "variance_type") == "learned_range"
    expected = (2 * sample.shape[1],) + tuple(sample.shape[2:]) if learned else tuple(sample.shape[1:])
    if tuple(model_output.shape[1:]) != expected:
        extra = " (noise and variance channels, variance_type='learned_range')" if learned else ""
        raise ValueError(f"model_output must have per-sample shape {expected}{extra}, got "
                         f"{tuple(model_output.shape[1:])}")
    if guidance_scale is not None:
        _ops.check_scale("guidance_scale", guidance_scale, batch, sample.device)
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real) or \
            not 0.0 <= float(guidance_rescale) <= 1.0:
        raise ValueError(f"guidance_rescale must be a float in [0, 1], got {guidance_rescale!r}")
    guidance_rescale = float(guidance_rescale)
    if guidance_rescale and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale (a 2B-row [uncond; cond] model_output)")
    _ops.check_tensor("out", out, like=sample, allow_none=True)
    if out is not None and out.dtype != sample.dtype:
        raise TypeError(f"out must have the sample's dtype {sample.dtype}, got {out.dtype}")
    for name, g in (("g_score", g_score), ("g_mean", g_mean)):
        _ops.check_tensor(name, g, like=sample, allow_none=True)
    _ops.check_tensor("noise", noise, like=sample, allow_none=True)
    if noise is not None and noise.dtype != sample.dtype:
        raise TypeError(f"noise must have the sample's dtype {sample.dtype}, got {noise.dtype}")
    _noise.check_generator(generator, batch, sample.device)
    compiling = torch.compiler.is_compiling()
    _dispatch.resolve(backend, sample.device)

    # Which row, from the scheduler's state (read only).
    plan = _plan(scheduler, state, _variant(kind, eta, use_clipped_model_output, s_churn, s_tmin, s_tmax, s_noise))
    if g_mean is not None and not plan.supports_mean_shift:
        raise ValueError(f"g_mean: a mean shift is defined only for DDPMScheduler, not {type(scheduler).__name__}")
    init_index = False
    x0_prev = None
    if kind in _INDEX_BASED:
        index, init_index = _indexed_step(scheduler, state, timestep)
    elif compiling and isinstance(timestep, torch.Tensor):
        index = None  # found on the device: reading the timestep on the host would break the graph
    else:
        index = _vp_row(plan, timestep)
    row = index if index is not None else plan.row_of_timestep(timestep).to(sample.device)
    if state.solver_order == 2 and scheduler.lower_order_nums >= 1 and \
            not _dpm_lower_order_final(scheduler, index, plan.num_steps):
        row = plan.num_steps + index
        # The previous step's x0 is the newest entry until this step shifts the list.
        x0_prev = scheduler.model_outputs[-1]
        if not isinstance(x0_prev, torch.Tensor) or tuple(x0_prev.shape) != tuple(sample.shape) or \
                x0_prev.device != sample.device:
            got = tuple(x0_prev.shape) if isinstance(x0_prev, torch.Tensor) else type(x0_prev).__name__
            raise ValueError(f"scheduler.model_outputs[-1] must be the previous step's x0 of the sample's shape "
                             f"{tuple(sample.shape)} on {sample.device}, got {got}")
    table = plan.table(sample.device)
    thresholding = state.threshold is not None

    thresh = None
    if thresholding:
        # The threshold is a quantile of the raw x0, which needs the whole tensor first: one x0-only pass.
        # x0 never depends on the noise for the schedulers that threshold (DDPM, DDIM, DPM).
        raw = torch.empty_like(sample, memory_format=torch.contiguous_format)
        _ops.guided_step(sample, model_output, table, row, scale=guidance_scale, rescale=guidance_rescale,
                         learned_variance=plan.learned_variance, x0_out=raw, write_out=False, backend=backend)
        thresh = _threshold(raw, *state.threshold)
    if guide is not None:
        # Guidance networks run before anything of the caller's changes, so a failing network leaves the
        # generator, out and the scheduler untouched.
        def predicted_x0() -> torch.Tensor:
            buf = torch.empty_like(sample, memory_format=torch.contiguous_format)
            _ops.guided_step(sample, model_output, table, row, scale=guidance_scale, rescale=guidance_rescale,
                             clip=state.clip, threshold=thresh, learned_variance=plan.learned_variance,
                             x0_out=buf, write_out=False, backend=backend)
            return buf
        extra_score, extra_mean, guided_table = guide(plan, index, predicted_x0)
        g_score = extra_score if g_score is None else (g_score if extra_score is None else g_score + extra_score)
        g_mean = extra_mean if g_mean is None else (g_mean if extra_mean is None else g_mean + extra_mean)
        if guided_table is not None:
            table = guided_table

    # Checks are done: from here on the generator, out and the scheduler may change. The scale goes on
    # as the caller gave it (a float scale stays a cached constant inside guided_step).
    z = None
    # With a device row, every row's noise column is applied to one draw (the rows that draw none hold 0).
    if plan.noise_steps[index] if index is not None and not compiling else plan.any_noise:
        if noise is not None:
            z = noise
        elif compiling and generator is not None:
            raise RuntimeError("fastguide.step inside torch.compile cannot draw from a torch.Generator (dynamo "
                               "cannot trace generators); draw the noise outside the compiled function and "
                               "pass noise=..., or pass generator=None")
        else:
            z = _noise.randn(sample.shape, generator, model_output.device, model_output.dtype)
    need_x0 = want_x0 or kind == _DPM
    x0 = torch.empty_like(sample, memory_format=torch.contiguous_format) if need_x0 else None
    threshold = thresh
    prev = _ops.guided_step(sample, model_output, table, row, scale=guidance_scale, rescale=guidance_rescale,
                            g_score=g_score, g_mean=g_mean, noise=z, x0_prev=x0_prev, clip=state.clip,
                            threshold=threshold,
                            learned_variance=plan.learned_variance, out=out,
                            x0_out=x0 if need_x0 else None, check_outputs_finite=check_finite, backend=backend)

    # Advance the scheduler exactly as its step() does.
    if kind in _INDEX_BASED:
        if init_index and not compiling:  # (it sets the index that the next line overwrites)
            scheduler._init_step_index(timestep)
        if kind == _DPM:
            order = state.solver_order
            for i in range(order - 1):
                scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
            scheduler.model_outputs[-1] = x0
            if scheduler.lower_order_nums < order:
                scheduler.lower_order_nums += 1
        scheduler._step_index = index + 1
        state.next_index = index + 1
    return prev, x0 if want_x0 else None


def step(model_output: torch.Tensor, timestep: Union[int, float, torch.Tensor], sample: torch.Tensor, *,
         scheduler, guidance_scale: Optional[Scale] = None, guidance_rescale: float = 0.0,
         generator: GeneratorArg = None, eta: float = 0.0, use_clipped_model_output: bool = False,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
         out: Optional[torch.Tensor] = None, guidance: Sequence = (), y: Optional[torch.Tensor] = None,
         check_finite: bool = False, backend: str = "auto", noise: Optional[torch.Tensor] = None,
         return_dict: bool = False) -> Union[torch.Tensor, StepOutput]:
    """CFG combine + ``scheduler.step`` of a diffusers scheduler in one fused op.

    With a 2B-row ``[uncond; cond]`` ``model_output`` and ``guidance_scale`` (a float or a [B] tensor) the
    result equals ``scheduler.step(u + w * (c - u), timestep, sample, ...).prev_sample``; with B rows and no
    ``guidance_scale`` it is the plain step. ``guidance_rescale`` is diffusers' ``rescale_noise_cfg``.
    ``eta``/``use_clipped_model_output`` are DDIMScheduler's step options, ``s_churn``/``s_tmin``/``s_tmax``/
    ``s_noise`` EulerDiscreteScheduler's. The scheduler's step state (step index, DPM-Solver's model
    outputs) advances as its own ``step`` would, and noise is drawn from ``generator`` exactly as it draws
    it. ``out`` receives the result (it may be ``sample``). ``return_dict=True`` returns a ``StepOutput``
    with ``prev_sample`` and ``pred_original_sample``.

    ``guidance=[ClassifierGuidance(...), DiscriminatorGuidance(...)]`` with target labels ``y`` adds those
    methods to the loop: DDPMScheduler shifts the mean by ``Sigma g`` (ADM ``condition_mean``; Ma et al.'s
    x0-input recipe, the only one here that needs DDPM), the others correct the score (``eps -= sigma g``).
    ``check_finite=True`` raises on NaN/Inf in ``model_output`` (a host sync on GPU). ``noise`` (the
    sample's shape and dtype) is used instead of drawing from ``generator`` on steps that draw noise.

    Inside ``torch.compile(fullgraph=True)`` the step traces without graph breaks once the scheduler's
    tables exist (``fastguide.dropin.prepare(scheduler, device)``, or one eager call): DDPM/DDIM find a
    timestep tensor's row on the device (the timestep is then trusted to be in the schedule); index-based
    schedulers (Euler, Euler ancestral, DPM-Solver++) take the step index from fastguide's own counter, which
    ``prepare`` sets (from the scheduler's step or begin index, else 0) and each step advances together with
    the scheduler's ``step_index``. Dynamo traces that counter as a symbolic integer (fastguide adds its name,
    and only its name, to ``torch.compiler.config.dynamic_sources``), so one graph serves every step
    (DPM-Solver++ 2M: four, for its first, second, middle and final steps). Noise must come as ``noise=``
    (or ``generator=None``, drawn by the compiled code's own RNG); ``guidance=`` is not traced.

    ``model_output`` and ``sample`` must share dtype and device. For DDPMScheduler with
    ``variance_type="learned_range"`` each half carries 2C channels (noise, then variance); the variance
    of the cond half is used.

    >>> scheduler.set_timesteps(50)
    >>> for t in scheduler.timesteps:
    ...     x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    ...     noise_pred = unet(x_in, t, encoder_hidden_states=embeds).sample      # [uncond; cond]
    ...     latents = fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5,
    ...                              generator=generator, out=latents)
    """
    if not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be a bool, got {type(return_dict).__name__}")
    guide = None
    if (guidance or y is not None) and torch.compiler.is_compiling():
        raise RuntimeError("fastguide.step(guidance=...) does not run inside torch.compile; compile the network "
                           "alone, or use fastguide.sample(..., compile='inductor') for guided loops")
    if guidance or y is not None:
        classifiers, discriminators = _dropin_guidance.split_specs(guidance)
        state = _scheduler_state(scheduler)
        _dropin_guidance.check(classifiers, discriminators, y, sample, state.kind == _DDPM,
                               type(scheduler).__name__)
        if classifiers or discriminators:
            guide = _dropin_guidance.make_guide(classifiers, discriminators, y, sample,
                                                _scalar_timestep(timestep),
                                                int(_cfg(scheduler, "num_train_timesteps")), backend)
    prev, x0 = _scheduler_step(model_output, timestep, sample, scheduler=scheduler, guidance_scale=guidance_scale,
                               guidance_rescale=guidance_rescale, generator=generator, eta=eta,
                               use_clipped_model_output=use_clipped_model_output, s_churn=s_churn, s_tmin=s_tmin,
                               s_tmax=s_tmax, s_noise=s_noise, out=out, backend=backend, want_x0=return_dict,
                               guide=guide, check_finite=check_finite, noise=noise)
    if return_dict:
        return StepOutput(prev_sample=prev, pred_original_sample=x0)
    return prev
