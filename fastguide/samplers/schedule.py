"""Noise schedules: the VP (DDPM) family and the EDM sigma family, and their timestep spacings.

A ``Schedule`` is a plain description (float64 numpy arrays and a few options); samplers turn it into a
per-step coefficient table (``fastguide.samplers``). All arrays are float64 so tables are exact to fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace", "guided", "guided-ddim")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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
    """A noise schedule. Build one with ``Schedule.ddpm``, ``Schedule.edm`` or ``Schedule.from_diffusers``.

    >>> sd = fastguide.Schedule.ddpm(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    >>> edm = fastguide.Schedule.edm(sigma_min=0.002, sigma_max=80.0)
    """

    kind: str                                  # "vp" or "edm"
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

    @staticmethod
    def ddpm(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
             beta_end: float = 0.02, prediction_type: str = "epsilon", variance_type: str = "fixed_small",
             rescale_betas_zero_snr: bool = False, timestep_spacing: str = "leading", steps_offset: int = 0,
             use_karras_sigmas: bool = False, betas: Optional[Sequence[float]] = None) -> "Schedule":
        """A VP schedule over ``num_train_timesteps`` training steps (or explicit ``betas``).

        ``timestep_spacing`` picks the sampling timesteps: diffusers' ``leading``/``trailing``/``linspace``
        or guided-diffusion's respacing (``guided``: evenly strided with rounding, ``guided-ddim``: the
        ``ddimN`` integer stride). ``use_karras_sigmas`` applies to the sigma samplers.
        """
        _choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _choice("variance_type", variance_type, VARIANCE_TYPES)
        _choice("timestep_spacing", timestep_spacing, SPACINGS)
        if betas is None:
            if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
                raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
            b = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end)
        else:
            b = np.asarray(betas, dtype=np.float64)
            if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b < 1)):
                raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
        if rescale_betas_zero_snr:
            b = rescale_zero_terminal_snr(b)
        abar = np.cumprod(1.0 - b)
        if rescale_betas_zero_snr:
            # As diffusers: keep the terminal step usable by samplers that divide by sqrt(alphā).
            abar[-1] = 2.0 ** -24
        return Schedule(kind="vp", prediction_type=prediction_type, alphas_cumprod=abar,
                        variance_type=variance_type, timestep_spacing=timestep_spacing,
                        steps_offset=int(steps_offset), use_karras_sigmas=bool(use_karras_sigmas))

    @staticmethod
    def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5,
            prediction_type: str = "sample") -> "Schedule":
        """Karras et al. 2022 sigma schedule; the model ``model(x, sigma, y)`` returns the denoised D(x; sigma)
        (``prediction_type="sample"``) or the noise (``"epsilon"``)."""
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        _choice("prediction_type", prediction_type, ("sample", "epsilon"))
        return Schedule(kind="edm", prediction_type=prediction_type, sigma_min=float(sigma_min),
                        sigma_max=float(sigma_max), rho=float(rho), sigma_data=float(sigma_data))

    @staticmethod
    def from_diffusers(scheduler) -> "Schedule":
        """The schedule of a diffusers scheduler, read from its config and its own ``alphas_cumprod``."""
        cfg = scheduler.config
        abar = getattr(scheduler, "alphas_cumprod", None)
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
        if self.kind != "vp":
            raise ValueError("an EDM schedule has no training timesteps")
        return len(self.alphas_cumprod)

    def timesteps(self, steps: int, integer: bool = True) -> np.ndarray:
        """The sampling timesteps, descending (training-step units). ``integer=False`` keeps diffusers'
        fractional ``linspace`` timesteps for the sigma samplers."""
        T = self.num_train_timesteps
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
