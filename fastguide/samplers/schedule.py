"""Noise schedules: the VP (DDPM) family, the EDM sigma family and rectified flow, and their timestep spacings.

A ``Schedule`` is a plain description (float64 numpy arrays and a few options); samplers turn it into a
per-step coefficient table (``fastguide.samplers``). All arrays are float64 so tables are exact to fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from ..core.checks import check_bool, check_int, check_real

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace", "guided", "guided-ddim")
TIME_SHIFT_TYPES = ("exponential", "linear")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# The coefficient tables are fp32 and hold 1/alphā-sized numbers (sigma^2 = (1 - alphā)/alphā, 1/sqrt(alphā)):
# a schedule whose alphā falls below fp32's smallest normal number would give inf/NaN samples.
MIN_ALPHAS_CUMPROD = float(np.finfo(np.float32).tiny)


def _positive(name: str, value) -> float:
    """A finite float > 0 (``check_real`` with the bound exclusive)."""
    v = check_real(name, value)
    if not v > 0.0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return v


def _open_unit(name: str, value, why: str) -> float:
    """A float strictly inside (0, 1) (``check_real`` with both bounds exclusive)."""
    v = check_real(name, value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1) ({why}), got {value!r}")
    return v


def _check_alphas_cumprod(abar: np.ndarray, what: str) -> None:
    """alphā of betas in (0, 1) must decrease strictly (else sigma(t) is not invertible and a step's beta is 0)
    and stay representable in the fp32 tables (``MIN_ALPHAS_CUMPROD``); ``what`` names the parameters."""
    if not abar[-1] >= MIN_ALPHAS_CUMPROD:
        with np.errstate(over="ignore", divide="ignore"):
            sigma = float(np.sqrt(np.float64(1.0) / abar[-1] - 1.0))
        raise ValueError(f"{what}: alphas_cumprod falls to {abar[-1]:.3g} (terminal noise level sigma = "
                         f"{sigma:.3g}), below float32's smallest normal number {MIN_ALPHAS_CUMPROD:.3g}, so the "
                         f"fp32 coefficient tables (1/alphas_cumprod) would overflow and the samples would be "
                         f"inf/NaN; use smaller betas or fewer training timesteps")
    steps = np.diff(abar)
    if not np.all(steps < 0):
        i = int(np.argmax(steps >= 0))
        raise ValueError(f"{what}: alphas_cumprod must decrease strictly, but 1 - beta rounds to 1 at training "
                         f"step {i + 1} (beta = {1.0 - abar[i + 1] / abar[i]:.3g}); use larger betas")


def make_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas of the named schedule (float64): diffusers' definitions, which equal guided-diffusion's."""
    _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    # Nichol & Dhariwal 2021 cosine schedule, betas capped at 0.999.
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                     for i in range(num_train_timesteps)], dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphā) so the last step has zero SNR."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> list:
    """guided-diffusion's respacing: which training timesteps to keep, ascending.

    ``section_counts`` is ``"ddimN"`` (a fixed stride giving exactly N steps) or a list / comma string of
    step counts per equal section of the training range, each section strided with rounding.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class Schedule:
    """A noise schedule. Build one with ``Schedule.ddpm``, ``Schedule.edm``, ``Schedule.flow`` or
    ``Schedule.from_diffusers``.

    >>> sd = fastguide.Schedule.ddpm(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    >>> edm = fastguide.Schedule.edm(sigma_min=0.002, sigma_max=80.0)
    >>> sd3 = fastguide.Schedule.flow(shift=3.0)
    """

    kind: str                                  # "vp", "edm" or "flow"
    prediction_type: str = "epsilon"
    # VP family
    alphas_cumprod: Optional[np.ndarray] = field(default=None, repr=False)
    variance_type: str = "fixed_small"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    use_karras_sigmas: bool = False
    # EDM family
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    # Flow family (rectified flow)
    shift: float = 1.0
    mu: Optional[float] = None
    time_shift_type: str = "exponential"
    shift_terminal: Optional[float] = None
    flow_train_timesteps: int = 1000

    @staticmethod
    def ddpm(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
             beta_end: float = 0.02, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
             rescale_betas_zero_snr: bool = False, timestep_spacing: str = "leading", steps_offset: int = 0,
             use_karras_sigmas: bool = False, betas: Optional[Sequence[float]] = None) -> "Schedule":
        """A VP (DDPM) schedule: ``x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) eps``, ``alphā_t = prod_{s<=t}
        (1 - beta_s)`` over ``num_train_timesteps`` training steps (or explicit ``betas``).

        Args:
            num_train_timesteps: int >= 2, default 1000. The number T of training steps; the model's
                timesteps are training-step indices 0 .. T-1. Ignored with ``betas`` (T = ``len(betas)``).
            beta_schedule: ``"linear"`` (default; betas evenly spaced from ``beta_start`` to ``beta_end``),
                ``"scaled_linear"`` (their square roots evenly spaced: Stable Diffusion) or ``"cosine"``
                (Nichol & Dhariwal 2021, diffusers' ``squaredcos_cap_v2``, betas capped at 0.999; it ignores
                ``beta_start``/``beta_end``).
            beta_start: float in (0, 1), default 1e-4. beta of the first training step (a per-step noise
                variance, unitless), for ``linear``/``scaled_linear``.
            beta_end: float in (0, 1), default 0.02. beta of the last training step. It may be smaller than
                ``beta_start``: decreasing betas are a valid schedule (alphā still decreases).
            prediction_type: what the model returns: ``"epsilon"`` (default, the noise), ``"v_prediction"``
                (Salimans & Ho 2022) or ``"sample"`` (x0).
            variance_type: the ``ddpm`` sampler's variance: ``"fixed_small"`` (default, the posterior
                variance), ``"fixed_large"`` (beta_t) or ``"learned_range"`` (the model returns 2C channels,
                the second C interpolating the log variance between the two, as guided-diffusion).
            rescale_betas_zero_snr: bool, default False. Rescale to zero terminal SNR (Lin et al. 2023); the
                terminal alphā is then 2^-24, as diffusers does, so samplers that divide by it still run.
            timestep_spacing: which training timesteps a run of ``steps`` steps visits: diffusers'
                ``"leading"`` (default), ``"trailing"``, ``"linspace"`` (fractional for the sigma samplers),
                or guided-diffusion's respacing ``"guided"`` (evenly strided with rounding) and
                ``"guided-ddim"`` (the ``ddimN`` integer stride).
            steps_offset: int >= 0, default 0. Added to the ``"leading"`` timesteps (Stable Diffusion: 1).
            use_karras_sigmas: bool, default False. The sigma samplers (``euler``, ``euler_ancestral``,
                ``heun``, ``dpmpp_2m``) space their noise levels as Karras et al. 2022 between the schedule's
                smallest and largest sampled sigma.
            betas: optional 1-D sequence of at least 2 floats in (0, 1), default None. Explicit betas; they
                replace ``num_train_timesteps``, ``beta_schedule``, ``beta_start`` and ``beta_end``.

        Every parameter is checked here, by name (``ValueError``/``TypeError``), including the resulting
        schedule: alphā must decrease strictly and stay above float32's smallest normal number, since the
        fp32 coefficient tables hold 1/alphā-sized numbers (``beta_start=0.5, beta_end=0.1`` over 1000 steps
        falls to 1e-161 and is rejected).

        >>> s = fastguide.Schedule.ddpm()                 # DDPM / ADM: linear 1e-4 .. 0.02 over 1000 steps
        >>> s.num_train_timesteps, s.timesteps(4).tolist()
        (1000, [750, 500, 250, 0])
        >>> sd = fastguide.Schedule.ddpm(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        ...                              steps_offset=1)                   # Stable Diffusion 1.x / 2.x
        >>> adm = fastguide.Schedule.ddpm(beta_schedule="cosine", variance_type="learned_range",
        ...                               timestep_spacing="guided")        # improved-diffusion / ADM
        """
        _choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _choice("variance_type", variance_type, VARIANCE_TYPES)
        _choice("timestep_spacing", timestep_spacing, SPACINGS)
        check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
        check_bool("use_karras_sigmas", use_karras_sigmas)
        steps_offset = check_int("steps_offset", steps_offset, minimum=0)
        if betas is None:
            num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
            _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
            if beta_schedule == "cosine":
                check_real("beta_start", beta_start)   # unused by the cosine schedule, but still a number
                check_real("beta_end", beta_end)
                what = f"beta_schedule='cosine' over num_train_timesteps={num_train_timesteps}"
            else:
                why = f"a per-step noise variance of beta_schedule={beta_schedule!r}"
                beta_start, beta_end = _open_unit("beta_start", beta_start, why), _open_unit("beta_end", beta_end, why)
                what = (f"beta_start={beta_start:g}, beta_end={beta_end:g} ({beta_schedule}) over "
                        f"num_train_timesteps={num_train_timesteps}")
            b = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        else:
            try:
                b = np.asarray(betas, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"betas must be a 1-D sequence of floats, got {type(betas).__name__}") from None
            if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b < 1)):
                raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
            what = f"betas ({len(b)} values in [{b.min():.3g}, {b.max():.3g}])"
        _check_alphas_cumprod(np.cumprod(1.0 - b), what)
        if rescale_betas_zero_snr:
            b = rescale_zero_terminal_snr(b)
        abar = np.cumprod(1.0 - b)
        if rescale_betas_zero_snr:
            # As diffusers: keep the terminal step usable by samplers that divide by sqrt(alphā).
            abar[-1] = 2.0 ** -24
        return Schedule(kind="vp", prediction_type=prediction_type, alphas_cumprod=abar,
                        variance_type=variance_type, timestep_spacing=timestep_spacing,
                        steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas)

    @staticmethod
    def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5,
            prediction_type: str = "sample") -> "Schedule":
        """The Karras et al. 2022 (EDM) sigma schedule on the state ``x = x0 + sigma eps``; the model is called
        as ``model(x, sigma, y)`` with ``sigma`` a [B] tensor of noise levels.

        Args:
            sigma_min: finite float > 0, default 0.002. The smallest noise level visited (the last step then
                goes to 0), in data units (the standard deviation of the added noise).
            sigma_max: finite float > ``sigma_min``, default 80.0. The starting noise level: unit-Gaussian
                ``x_T`` is scaled by it.
            rho: finite float > 0, default 7.0. Exponent of the Karras ramp ``sigma_i = (sigma_max^(1/rho) +
                i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``; larger rho spends more steps at low noise.
            sigma_data: finite float > 0, default 0.5. The data's standard deviation (EDM's preconditioning
                constant), kept with the schedule for the user's own denoiser; the samplers do not read it.
            prediction_type: ``"sample"`` (default: the model returns the denoised D(x; sigma)) or
                ``"epsilon"`` (it returns the noise, ``(x - D) / sigma``).

        Every parameter is checked here, by name (``ValueError``/``TypeError``).

        >>> edm = fastguide.Schedule.edm()                       # EDM's defaults: 0.002 .. 80, rho = 7
        >>> edm.karras_sigmas(3).round(3).tolist()
        [80.0, 2.515, 0.002]
        >>> dg = fastguide.Schedule.edm(sigma_min=0.002, sigma_max=80.0, rho=7.0, prediction_type="epsilon")
        """
        sigma_min = _positive("sigma_min", sigma_min)
        sigma_max = _positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r} >= sigma_max={sigma_max!r}")
        rho = _positive("rho", rho)
        sigma_data = _positive("sigma_data", sigma_data)
        _choice("prediction_type", prediction_type, ("sample", "epsilon"))
        return Schedule(kind="edm", prediction_type=prediction_type, sigma_min=sigma_min, sigma_max=sigma_max,
                        rho=rho, sigma_data=sigma_data)

    @staticmethod
    def flow(shift: float = 1.0, num_train_timesteps: int = 1000, mu: Optional[float] = None,
             time_shift_type: str = "exponential", shift_terminal: Optional[float] = None) -> "Schedule":
        """Rectified flow (SD3, Flux, Wan, ...): the state ``x = (1 - s) x0 + s eps`` at the noise level
        ``s`` in [0, 1] (s = 1: pure noise, the unit-Gaussian ``x_T`` itself), and a model that predicts the
        velocity ``v = eps - x0`` (``prediction_type="flow_prediction"``). The model is called as
        ``model(x, t, y)`` with ``t = s * num_train_timesteps``, a ``[B]`` float32 tensor: the timestep
        diffusers' ``FlowMatchEulerDiscreteScheduler`` passes (SD3's and Flux's transformers take it so; a
        model that wants s itself divides by ``num_train_timesteps``). Its samplers are ``euler`` and ``heun``
        on the ODE ``dx/ds = v = (x - x0^) / s``, with ``x0^ = x - s v``.

        A run of N steps visits the sigmas of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift,
        ...).set_timesteps(N, mu=mu)``: ``u`` evenly spaced from 1 down to ``u_min`` and then shifted,
        ``s = shift u / (1 + (shift - 1) u)`` (diffusers' ``u_min`` is the shifted ``1 / T``, so its last
        sigma is ``1 / T`` shifted twice), then the final step to s = 0.

        Args:
            shift: finite float > 0, default 1.0 (no shift). The static timestep shift (SD3: 3.0); larger
                values spend more steps at high noise.
            num_train_timesteps: int >= 2, default 1000. T, the scale of the model's timestep.
            mu: optional finite float, default None. Resolution-dependent ("dynamic") shifting, as diffusers'
                ``use_dynamic_shifting=True`` with ``set_timesteps(..., mu=mu)`` (Flux): ``u`` runs from 1 to
                ``1 / T`` and ``s = e^mu / (e^mu + 1/u - 1)``. It replaces ``shift`` (leave that at 1.0).
            time_shift_type: ``"exponential"`` (default, the formula above) or ``"linear"``
                (``s = mu / (mu + 1/u - 1)``, mu > 0), for ``mu``.
            shift_terminal: optional float in (0, 1), default None. Stretch the shifted sigmas so the last one
                is ``shift_terminal`` (diffusers' option of that name; LTX-Video).

        Every parameter is checked here, by name (``ValueError``/``TypeError``); the sigmas of a given step
        count are checked (finite, in (0, 1], decreasing) when a sampler is built.

        >>> sd3 = fastguide.Schedule.flow(shift=3.0)
        >>> sd3.flow_sigmas(4).round(4).tolist()
        [1.0, 0.8577, 0.6022, 0.0089]
        >>> flux = fastguide.Schedule.flow(mu=1.15)
        """
        shift = _positive("shift", shift)
        num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
        _choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        if mu is not None:
            mu = check_real("mu", mu)
            if shift != 1.0:
                raise ValueError(f"mu (dynamic shifting) replaces shift; pass one of them, got shift={shift!r} "
                                 f"and mu={mu!r}")
            if time_shift_type == "linear" and not mu > 0:
                raise ValueError(f"mu must be > 0 with time_shift_type='linear', got {mu!r}")
            if time_shift_type == "exponential" and abs(mu) > 50:
                raise ValueError(f"mu must be in [-50, 50] (exp(mu) in float64 range with room), got {mu!r}")
        if shift_terminal is not None:
            shift_terminal = _open_unit("shift_terminal", shift_terminal, "the last sigma of the stretched "
                                        "schedule")
        return Schedule(kind="flow", prediction_type="flow_prediction", shift=shift, mu=mu,
                        time_shift_type=time_shift_type, shift_terminal=shift_terminal,
                        flow_train_timesteps=num_train_timesteps)

    @staticmethod
    def from_diffusers(scheduler) -> "Schedule":
        """The schedule of a diffusers scheduler, read from its config and its own ``alphas_cumprod``.

        Args:
            scheduler: a diffusers VP scheduler instance (``DDPMScheduler``, ``DDIMScheduler``,
                ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``DPMSolverMultistepScheduler``, ...: any
                with ``alphas_cumprod``). Read: ``alphas_cumprod`` (copied, float64) and the config's
                ``prediction_type`` (default ``"epsilon"``), ``variance_type`` (None: ``"fixed_small"``),
                ``timestep_spacing`` (``leading``/``trailing``/``linspace``; default ``"leading"``),
                ``steps_offset`` (default 0) and ``use_karras_sigmas`` (default False). Or a flow-matching
                scheduler (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``): its
                ``shift``, ``num_train_timesteps``, ``shift_terminal`` and ``time_shift_type`` make a
                ``Schedule.flow``; ``use_dynamic_shifting`` needs the per-call mu (use
                ``Schedule.flow(mu=...)``), and ``invert_sigmas``, ``stochastic_sampling`` and the Karras /
                exponential / beta sigmas have no native sampler (``ValueError`` naming the option). The
                scheduler is not changed, and the sampler is chosen separately
                (``fastguide.sample(..., sampler=...)``).

        Raises ``ValueError`` naming the config entry that fastguide's samplers do not have.

        >>> from diffusers import DDIMScheduler
        >>> s = fastguide.Schedule.from_diffusers(DDIMScheduler(beta_schedule="scaled_linear",
        ...                                                     beta_start=0.00085, beta_end=0.012))
        >>> s.prediction_type, s.num_train_timesteps
        ('epsilon', 1000)
        """
        cfg = scheduler.config
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None and "shift" in cfg and "num_train_timesteps" in cfg:
            return _flow_from_config(type(scheduler).__name__, cfg)
        if abar is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: not a VP scheduler")
        prediction_type = cfg.get("prediction_type", "epsilon")
        _choice("scheduler.config.prediction_type", prediction_type, PREDICTION_TYPES)
        variance_type = cfg.get("variance_type", None) or "fixed_small"
        _choice("scheduler.config.variance_type", variance_type, VARIANCE_TYPES)
        spacing = cfg.get("timestep_spacing", "leading")
        _choice("scheduler.config.timestep_spacing", spacing, ("leading", "trailing", "linspace"))
        abar = np.asarray(abar.double().cpu().numpy() if hasattr(abar, "double") else abar, dtype=np.float64)
        return Schedule(kind="vp", prediction_type=prediction_type, alphas_cumprod=abar.copy(),
                        variance_type=variance_type, timestep_spacing=spacing,
                        steps_offset=int(cfg.get("steps_offset", 0)),
                        use_karras_sigmas=bool(cfg.get("use_karras_sigmas", False)))

    # ---- VP helpers -------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        if self.kind == "flow":
            return self.flow_train_timesteps
        if self.kind != "vp":
            raise ValueError("an EDM schedule has no training timesteps")
        return len(self.alphas_cumprod)

    def timesteps(self, steps: int, integer: bool = True) -> np.ndarray:
        """The sampling timesteps, descending (training-step units). ``integer=False`` keeps diffusers'
        fractional ``linspace`` timesteps for the sigma samplers. A flow schedule's are ``s * T`` (fractional)."""
        T = self.num_train_timesteps
        if self.kind == "flow":
            return self.flow_sigmas(steps) * T
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        sp = self.timestep_spacing
        if sp == "linspace":
            t = np.linspace(0, T - 1, steps)[::-1]
            return t.round() if integer else t.copy()
        if sp == "leading":
            ratio = T // steps
            return (np.arange(0, steps) * ratio).round()[::-1] + self.steps_offset
        if sp == "trailing":
            return np.round(np.arange(T, 0, -T / steps)) - 1
        kept = space_timesteps(T, f"ddim{steps}" if sp == "guided-ddim" else [steps])
        return np.array(kept[::-1], dtype=np.float64)

    def sigma_of_t(self, t: np.ndarray) -> np.ndarray:
        """sigma = sqrt((1 - alphā)/alphā) at (possibly fractional) training timesteps, interpolated linearly
        as diffusers' ``EulerDiscreteScheduler`` does."""
        sig = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        return np.interp(t, np.arange(len(sig)), sig)

    def t_of_sigma(self, sigma: np.ndarray) -> np.ndarray:
        """Inverse of ``sigma_of_t`` by interpolation in log-sigma (diffusers' ``_sigma_to_t``)."""
        log_sig = np.log(np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod))
        return np.interp(np.log(np.maximum(sigma, 1e-10)), log_sig, np.arange(len(log_sig)))

    # ---- flow helpers -----------------------------------------------------------------------------
    def flow_sigmas(self, steps: int) -> np.ndarray:
        """The ``steps`` noise levels s of a flow run, descending from 1 (float64; the final 0 is not
        included): those of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (see ``flow``)."""
        if self.kind != "flow":
            raise ValueError(f"flow_sigmas needs a flow schedule (Schedule.flow), got kind={self.kind!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        T = self.flow_train_timesteps
        if self.mu is None:
            u = np.linspace(1.0, _static_shift(self.shift, 1.0 / T), steps)
            sig = _static_shift(self.shift, u)
        else:
            u = np.linspace(1.0, 1.0 / T, steps)
            with np.errstate(divide="ignore", over="ignore"):
                if self.time_shift_type == "exponential":
                    sig = math.exp(self.mu) / (math.exp(self.mu) + (1.0 / u - 1.0))
                else:
                    sig = self.mu / (self.mu + (1.0 / u - 1.0))
        if self.shift_terminal is not None:
            scale = (1.0 - sig[-1]) / (1.0 - self.shift_terminal)   # diffusers' stretch_shift_to_terminal
            with np.errstate(divide="ignore", invalid="ignore"):
                sig = 1.0 - (1.0 - sig) / scale
        if not (np.all(np.isfinite(sig)) and np.all(sig > 0) and np.all(sig <= 1) and np.all(np.diff(sig) < 0)):
            raise ValueError(f"the flow schedule (shift={self.shift}, mu={self.mu}, time_shift_type="
                             f"{self.time_shift_type!r}, shift_terminal={self.shift_terminal}) gives sigmas "
                             f"{np.round(sig, 6).tolist()[:8]}... over {steps} steps: they must be finite, in "
                             f"(0, 1] and strictly decreasing")
        return sig

    # ---- EDM helpers ------------------------------------------------------------------------------
    def karras_sigmas(self, steps: int, sigma_min: Optional[float] = None,
                      sigma_max: Optional[float] = None) -> np.ndarray:
        """Karras et al. 2022 eq. 5: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, N values."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        lo = self.sigma_min if sigma_min is None else sigma_min
        hi = self.sigma_max if sigma_max is None else sigma_max
        inv = 1.0 / self.rho
        ramp = np.linspace(0, 1, steps) if steps > 1 else np.zeros(1)
        return (hi ** inv + ramp * (lo ** inv - hi ** inv)) ** self.rho


def vp_time_of_sigma(sigma: np.ndarray, beta_min: float = 0.1, beta_max: float = 20.0) -> np.ndarray:
    """The VP-SDE time tau in [0, 1] with sigma(tau) = sqrt(exp(beta_min tau + (beta_max-beta_min) tau^2/2) - 1).

    Discriminator guidance (Kim et al. 2022) conditions its discriminator on this time for EDM samplers.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    d = beta_max - beta_min
    return (np.sqrt(beta_min ** 2 + 2 * d * np.log1p(sigma ** 2)) - beta_min) / d


def _static_shift(shift: float, u):
    """diffusers' static timestep shift ``shift u / (1 + (shift - 1) u)``."""
    return shift * u / (1.0 + (shift - 1.0) * u)


_FLOW_UNSUPPORTED = ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas")


def _flow_from_config(name: str, cfg) -> Schedule:
    """``Schedule.flow`` of a diffusers flow-matching scheduler's config (see ``Schedule.from_diffusers``)."""
    if cfg.get("use_dynamic_shifting", False):
        raise ValueError(f"scheduler.config.use_dynamic_shifting=True: {name}'s shift comes from the mu passed "
                         f"to set_timesteps; build the schedule with fastguide.Schedule.flow(mu=..., "
                         f"num_train_timesteps=..., time_shift_type=...) instead")
    for option in _FLOW_UNSUPPORTED:
        if cfg.get(option, False):
            raise ValueError(f"scheduler.config.{option}={cfg.get(option)!r} has no native fastguide sampler "
                             f"(the drop-in fastguide.step supports it on FlowMatchEulerDiscreteScheduler)")
    return Schedule.flow(shift=float(cfg.get("shift", 1.0)),
                         num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                         time_shift_type=cfg.get("time_shift_type", "exponential"),
                         shift_terminal=cfg.get("shift_terminal", None) or None)
