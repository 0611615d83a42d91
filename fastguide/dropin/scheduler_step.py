"""Drop-in replacement for ``scheduler.step`` of diffusers schedulers, with the CFG combine fused in.

``fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=w)`` returns what
``scheduler.step(u + w * (c - u), t, latents)`` of the diffusers scheduler returns, and advances the
scheduler's step state the same way, so a pipeline may switch between the two mid-loop.

How: every supported scheduler step is one row of a coefficient table built from the scheduler's own
state (``fastguide.samplers.scheduler_tables``), kept on the device. A call checks its arguments once
(``_check_call``), finds its row on the host (the timestep's position for DDPM/DDIM, the scheduler's step
counter for the others; ``select_row``), computes guidance terms (``_guidance_terms``), draws noise exactly
where, and in the shape and dtype, diffusers draws it (``_draw_noise``), runs one fused kernel and advances
the scheduler (``call.advance``).

Supported: ``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler`` (``dpmsolver++`` and ``sde-dpmsolver++``,
order 1, 2 or 3), ``UniPCMultistepScheduler`` (bh1 / bh2, order 1 or 2, its corrector: ``dropin.unipc``),
``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Wan, Qwen-Image: every config option, stochastic
sampling included), ``FlowMatchHeunDiscreteScheduler`` (both stages, churn, its stored derivative / dt /
sample kept as its own step keeps them) and ``LCMScheduler``. Anything else raises ``ValueError`` naming the
scheduler or the option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from ..backends import dispatch as _dispatch
from ..core import noise as _noise
from ..core import ops as _ops
from ..core.args import StepArgs
from ..core.checks import (Scale, check_bool, check_finite, check_fraction, check_model_output, check_real,
                           check_sample, check_scale, check_tensor)
from ..samplers.scheduler_tables import DDIM, DDPM, DPM, EULER, FLOW, FLOW_HEUN, LCM, UNIPC, config
from . import guidance as _dropin_guidance
from . import guiders as _guiders
from . import repeat as _repeat
from . import unipc as _unipc
from .call import Call, GeneratorArg, advance, scalar_timestep, select_row, warn_if_input_not_scaled
from .checked import Checked, plain_call_key
from .schedulers import SchedulerState, heun_store, output_of, plan_of, scheduler_state, variant

_DEFAULT_CHURN = (0.0, 0.0, math.inf, 1.0)


@dataclass
class StepOutput:
    """What ``fastguide.step(..., return_dict=True)`` returns for a scheduler whose diffusers module defines no
    output class of its own (normally the scheduler's own class is returned; it has these fields).

    Attributes:
        prev_sample: the next state x_{t-1}, the sample's shape, dtype and device (the tensor ``out`` when one
            was given): ``scheduler.step(...).prev_sample``.
        pred_original_sample: the step's predicted x0^ (clipped / thresholded as the scheduler does; with a
            score-correction guidance term, the corrected x0^, as guided-diffusion's ``condition_score``
            recomputes it), the sample's shape, dtype and device: diffusers' ``pred_original_sample`` (for
            DPMSolverMultistepScheduler, which returns none, the x0 it keeps in ``model_outputs``).

    >>> res = fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5, return_dict=True)
    >>> latents, x0 = res.prev_sample, res.pred_original_sample
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Checks (all before anything is drawn, written or advanced)


def _check_scheduler_options(scheduler, kind: str, eta, use_clipped_model_output, churn: tuple) -> tuple:
    """The step options that only some schedulers' step() takes; returns the plan's options key. The common
    all-default call skips the checks."""
    if eta != 0.0 or use_clipped_model_output is not False:
        eta = check_real("eta", eta, minimum=0.0)
        check_bool("use_clipped_model_output", use_clipped_model_output)
        if kind != DDIM and (eta != 0.0 or use_clipped_model_output):
            name = "eta" if eta != 0.0 else "use_clipped_model_output"
            raise ValueError(f"{name} applies only to DDIMScheduler, not {type(scheduler).__name__}")
    if churn != _DEFAULT_CHURN:
        s_churn, s_tmin, s_tmax, s_noise = churn
        churn = (check_real("s_churn", s_churn, minimum=0.0), check_real("s_tmin", s_tmin, allow_inf=True),
                 check_real("s_tmax", s_tmax, allow_inf=True), check_real("s_noise", s_noise))
        if kind not in (EULER, FLOW_HEUN):
            raise ValueError(f"s_churn/s_tmin/s_tmax/s_noise apply only to EulerDiscreteScheduler and "
                             f"FlowMatchHeunDiscreteScheduler, not {type(scheduler).__name__}")
    return variant(kind, eta, use_clipped_model_output, *churn)


def _check_call(model_output, sample, scheduler, guidance_scale, guidance_rescale, generator, options: tuple,
                out, g_score, g_mean, noise, check_outputs_finite: bool, backend: str, combine=None,
                extra=None, state: Optional[SchedulerState] = None) -> Call:
    state = state if state is not None else scheduler_state(scheduler)
    if options is None:
        options = variant(state.kind, 0.0, False, *_DEFAULT_CHURN)
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling and noise is None and g_score is None and g_mean is None and combine is None:
        key = plain_call_key(model_output, sample, out, guidance_scale, guidance_rescale, options)
    checked = state.checked.get(key) if key is not None else None
    if checked is None:
        checked = _check_arguments(model_output, sample, scheduler, state, guidance_scale, guidance_rescale,
                                   generator, options, out, g_score, g_mean, noise, backend, combine, extra)
        if key is not None:
            state.checked.put(key, checked)
    elif generator is not None:  # (not in the key: checked on every call, where the checks check it)
        _noise.check_generator(generator, sample.shape[0], sample.device)
    impl = _dispatch.resolve(backend, sample.device)  # (every call: it follows which backends are built)
    args = StepArgs(sample, model_output, checked.table, 0, scale=checked.scale, rescale=checked.rescale,
                    g_score=g_score, g_mean=g_mean, learned_variance=checked.plan.learned_variance, out=out,
                    combine=combine, extra=extra)
    _ops.set_clip(args, state.clip, None)
    return Call(state, checked.plan, options, args, noise, generator, check_outputs_finite, backend, impl=impl,
                compiling=compiling, memo=checked if key is not None else None)


def _check_arguments(model_output, sample, scheduler, state: SchedulerState, guidance_scale, guidance_rescale,
                     generator, options: tuple, out, g_score, g_mean, noise, backend: str, combine,
                     extra) -> Checked:
    batch = check_sample("sample", sample)
    learned = state.kind == DDPM and config(scheduler, "variance_type") == "learned_range"
    check_model_output(model_output, sample, guidance_scale is not None or combine is not None, learned)
    if model_output.dtype != sample.dtype:
        raise TypeError(f"model_output has dtype {model_output.dtype} but sample has {sample.dtype}; "
                        "pass both in the same dtype")
    w = check_scale("guidance_scale", guidance_scale, batch, sample.device) if guidance_scale is not None else None
    rescale = check_fraction("guidance_rescale", guidance_rescale)
    if rescale and w is None:
        raise ValueError("guidance_rescale needs guidance_scale (a 2B-row [uncond; cond] model_output)")
    check_tensor("out", out, like=sample, allow_none=True, same_dtype=True)
    if g_score is not None or g_mean is not None:
        for name, g in (("g_score", g_score), ("g_mean", g_mean)):
            check_tensor(name, g, like=sample, allow_none=True)
    check_tensor("noise", noise, like=sample, allow_none=True, same_dtype=True)
    if generator is not None:
        _noise.check_generator(generator, batch, sample.device)
    _dispatch.resolve(backend, sample.device)
    plan = plan_of(scheduler, state, options)
    if g_mean is not None and not plan.supports_mean_shift:
        raise ValueError(f"g_mean: a mean shift is defined only for DDPMScheduler, not {type(scheduler).__name__}")
    return Checked(plan, plan.table(sample.device), w, rescale)


# ---------------------------------------------------------------------------------------------------
# What the row is applied to


def _predicted_x0(call: Call, clip: bool = True, guided: bool = False) -> torch.Tensor:
    """x0^ of this step (the x0-only pass of the fused kernel), before any guidance term (with ``guided``,
    after the score correction: UniPC's corrector reads the guided x0^)."""
    a = call.args
    x0 = torch.empty_like(a.sample, memory_format=torch.contiguous_format)
    predict = StepArgs(a.sample, a.model_output, a.table, a.step, scale=a.scale, rescale=a.rescale,
                       g_score=a.g_score if guided else None, learned_variance=a.learned_variance, x0_out=x0,
                       write_out=False, combine=a.combine, extra=a.extra)
    if clip:
        predict.clip_mode, predict.clip_lo, predict.clip_hi, predict.threshold = \
            a.clip_mode, a.clip_lo, a.clip_hi, a.threshold
    _ops.run_step(predict, call.backend, call.impl)
    return x0


def _lcm_denoised(call: Call) -> torch.Tensor:
    """LCMScheduler's ``denoised`` (``c_skip x + c_out x0^``, its second output): the plan's second block, one
    more pass without noise, run before the step proper (whose ``out`` may be ``sample``)."""
    a = call.args
    denoised = torch.empty_like(a.sample, memory_format=torch.contiguous_format)
    pass_args = StepArgs(a.sample, a.model_output, a.table, a.step + call.plan.num_steps, scale=a.scale,
                         rescale=a.rescale, g_score=a.g_score, learned_variance=a.learned_variance, out=denoised,
                         combine=a.combine, extra=a.extra)
    pass_args.clip_mode, pass_args.clip_lo, pass_args.clip_hi, pass_args.threshold = \
        a.clip_mode, a.clip_lo, a.clip_hi, a.threshold
    _ops.run_step(pass_args, call.backend, call.impl)
    return denoised


def _threshold(call: Call) -> None:
    """Saharia et al. 2022 dynamic threshold per sample: the ``ratio`` quantile of |x0^|, clamped to
    [1, max_value] (in fp32 like diffusers, which upcasts half inputs). The quantile needs the whole raw x0
    first: one x0-only pass (x0 never depends on the noise for the schedulers that threshold)."""
    ratio, max_value = call.state.threshold
    raw = _predicted_x0(call, clip=False)
    flat = raw.reshape(raw.shape[0], -1).abs().float()
    _ops.set_clip(call.args, None, torch.quantile(flat, ratio, dim=1).clamp(min=1, max=max_value))


def _guidance_terms(call: Call, guide: Callable, index: Optional[int]) -> None:
    """Add the guidance networks' gradients (and, for Ma et al.'s gamma, its table) to the call. They run
    before anything of the caller's changes, so a failing network leaves generator, out and scheduler alone."""
    a = call.args
    extra_score, extra_mean, guided_table = guide(call.plan, index, lambda: _predicted_x0(call))
    a.g_score = extra_score if a.g_score is None else (a.g_score if extra_score is None else a.g_score + extra_score)
    a.g_mean = extra_mean if a.g_mean is None else (a.g_mean if extra_mean is None else a.g_mean + extra_mean)
    if guided_table is not None:
        a.table = guided_table


def _heun_inputs(call: Call) -> Optional[torch.Tensor]:
    """FlowMatchHeunDiscreteScheduler: draw churn noise where diffusers draws it (a second stage's cancels out
    of its result, but the generator advances), add a first stage's churn to the sample, and return the sample
    the scheduler keeps (a copy when ``out`` would overwrite it), the derivative going to ``x0_out``."""
    stage, a = call.heun, call.args
    z = None
    if stage.draws:
        z = call.noise if call.noise is not None else \
            _noise.randn(a.sample.shape, call.generator, a.model_output.device, a.model_output.dtype)
    if stage.second:
        return None
    if z is not None:   # as diffusers: x + (z s_noise) sqrt(sigma_hat^2 - sigma^2), its fp32 amplitude
        a.sample = a.sample + (z * call.options[3]) * float(stage.plan.heun_churn[stage.index])
    elif a.out is not None and a.out.untyped_storage().data_ptr() == a.sample.untyped_storage().data_ptr():
        a.sample = a.sample.clone()
    a.x0_out = torch.empty_like(a.sample, memory_format=torch.contiguous_format)
    return a.sample


def _draw_noise(call: Call, index: Optional[int]) -> None:
    """The step's noise, where diffusers draws it: the caller's ``noise``, or drawn from the generator."""
    plan, a = call.plan, call.args
    compiling = call.compiling
    # With a device row, every row's noise column is applied to one draw (the rows that draw none hold 0).
    if not (plan.noise_steps[index] if index is not None and not compiling else plan.any_noise):
        return
    if call.noise is not None:
        a.noise = call.noise
    elif compiling and call.generator is not None:
        raise RuntimeError("fastguide.step inside torch.compile cannot draw from a torch.Generator (dynamo "
                           "cannot trace generators); draw the noise outside the compiled function and "
                           "pass noise=..., or pass generator=None")
    elif plan.fp32_noise:
        # FlowMatchEulerDiscreteScheduler.step and DPMSolverMultistepScheduler.step (sde-dpmsolver++) draw in
        # float32 whatever the model's dtype, so the generator advances and the values come out exactly as there.
        z = _noise.randn(a.sample.shape, call.generator, a.model_output.device, torch.float32)
        a.noise = z if z.dtype == a.sample.dtype else z.to(a.sample.dtype)
    else:
        a.noise = _noise.randn(a.sample.shape, call.generator, a.model_output.device, a.model_output.dtype)


def scheduler_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, *, scheduler,
                   guidance_scale: Optional[Scale] = None, guidance_rescale: float = 0.0,
                   generator: GeneratorArg = None, options: Optional[tuple] = None,
                   out: Optional[torch.Tensor] = None,
                   backend: str = "auto", want_x0: bool = False, g_score: Optional[torch.Tensor] = None,
                   g_mean: Optional[torch.Tensor] = None, guide: Optional[Callable] = None,
                   check_finite_output: bool = False, noise: Optional[torch.Tensor] = None,
                   combine: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None,
                   state: Optional[SchedulerState] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One scheduler step; returns (prev_sample, x0 or None); for LCMScheduler the second value is its
    ``denoised`` output instead of x0^.

    ``options`` is the plan key of the scheduler's step options (``schedulers.variant``; None: the
    defaults); ``state`` the scheduler's ``scheduler_state`` when the caller has it already.
    ``combine``/``extra``: a per-sample linear combine instead of ``guidance_scale`` (a guider,
    ``dropin.guiders``). ``g_score`` (``eps -= sigma g``) and ``g_mean`` (DDPM mean shift ``mu += Sigma g``)
    are gradients already scaled;
    ``guide(plan, index, predicted_x0) -> (g_score, g_mean, table or None)`` computes guidance terms once
    the row is known (``dropin.guidance``). Everything is checked before the generator, ``out`` or the
    scheduler is touched.
    """
    call = _check_call(model_output, sample, scheduler, guidance_scale, guidance_rescale, generator, options, out,
                       g_score, g_mean, noise, check_finite_output, backend, combine, extra, state)
    index, init_index = select_row(scheduler, call, timestep)
    if call.state.kind == UNIPC:
        call.unipc = _unipc.select(scheduler, call, index)
    if call.state.threshold is not None:
        _threshold(call)
    if guide is not None:
        _guidance_terms(call, guide, index)
    if call.check_finite:
        check_finite("model_output", model_output)
    # Checks are done: from here on the generator, out and the scheduler may change.
    if not call.compiling:  # (a log call would break the graph)
        warn_if_input_not_scaled(scheduler)
    if call.heun is not None:
        kept = _heun_inputs(call)
        derivative = call.args.x0_out
        prev = _ops.run_step(call.args, backend, call.impl)
        heun_store(scheduler, call.state, call.heun, kept, derivative)
        advance(scheduler, call.state, index, init_index, timestep, None, call.compiling)
        return prev, None
    if call.unipc is not None:
        prev = _unipc.run(scheduler, call, lambda: _predicted_x0(call, guided=True), timestep, backend)
        advance(scheduler, call.state, index, init_index, timestep, None, call.compiling)
        return prev, None
    _draw_noise(call, index)
    lcm = call.state.kind == LCM
    denoised = _lcm_denoised(call) if want_x0 and lcm else None
    need_x0 = want_x0 and not lcm or call.state.kind == DPM
    x0 = call.args.x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format) if need_x0 else None
    prev = _ops.run_step(call.args, backend, call.impl)
    advance(scheduler, call.state, index, init_index, timestep, x0, call.compiling)
    if call.memo is not None and call.memo.lane is None:
        call.memo.lane = _repeat.lane_for(call)
    return prev, (denoised if lcm else x0) if want_x0 else None


def _guide_of(scheduler, state: SchedulerState, guidance, y, sample: torch.Tensor, timestep,
              backend: str) -> Optional[Callable]:
    """The guidance hook of a ``guidance=`` list, everything about it checked first; None for no networks."""
    classifiers, discriminators = _dropin_guidance.split_specs(guidance)
    if state.kind == UNIPC and (classifiers or discriminators) and config(scheduler, "use_flow_sigmas", False):
        raise ValueError("guidance: classifier / discriminator guidance with UniPCMultistepScheduler needs "
                         "scheduler.config.use_flow_sigmas=False (its VP state); CFG works with both")
    if state.kind == FLOW_HEUN and any(c.input == "x0" for c in classifiers):
        raise ValueError("guidance: ClassifierGuidance(input='x0') is not supported for "
                         "FlowMatchHeunDiscreteScheduler (its rows carry the derivative, not x0^); use "
                         "input='xt', or FlowMatchEulerDiscreteScheduler")
    _dropin_guidance.check(classifiers, discriminators, y, sample, state.kind == DDPM, type(scheduler).__name__,
                           x0_as_score=state.kind == FLOW)
    if not (classifiers or discriminators):
        return None
    if state.kind == FLOW and config(scheduler, "invert_sigmas", False):
        raise ValueError("guidance: scheduler.config.invert_sigmas=True runs the sigmas upwards, so the state "
                         "is not x = (1 - s) x0 + s eps of its sigma s and the score correction is undefined; "
                         "classifier / discriminator guidance needs invert_sigmas=False")
    return _dropin_guidance.make_guide(classifiers, discriminators, y, sample, scalar_timestep(timestep),
                                       int(config(scheduler, "num_train_timesteps")), backend)


def step(model_output: torch.Tensor, timestep: Union[int, float, torch.Tensor], sample: torch.Tensor, *,
         scheduler, guidance_scale: Optional[Scale] = None, guidance_rescale: float = 0.0,
         generator: GeneratorArg = None, eta: float = 0.0, use_clipped_model_output: bool = False,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
         out: Optional[torch.Tensor] = None, guidance: Sequence = (), y: Optional[torch.Tensor] = None,
         check_finite: bool = False, backend: str = "auto", noise: Optional[torch.Tensor] = None,
         return_dict: Optional[bool] = None, guider: Any = None) -> Union[torch.Tensor, tuple, Any]:
    """CFG combine + ``scheduler.step`` of a diffusers scheduler in one fused op.

    With a 2B-row ``[uncond; cond]`` ``model_output`` and ``guidance_scale`` (a float or a [B] tensor) the
    result equals ``scheduler.step(u + w * (c - u), timestep, sample, ...).prev_sample``; with B rows and no
    ``guidance_scale`` it is the plain step. The scheduler's step state (step index, DPM-Solver's model
    outputs) advances as its own ``step`` would, and noise is drawn from ``generator`` exactly as it draws
    it, so a pipeline may switch between the two mid-loop. Like diffusers' Euler / Euler ancestral ``step``,
    it logs diffusers' warning ("The `scale_model_input` function should be called before `step` ...", with
    the scheduler module's logger, level WARNING, once per call) while ``scheduler.scale_model_input`` has
    never been called (not inside ``torch.compile``, where a log call would break the graph).

    Args:
        model_output: the network output for ``sample``: ``[2B, ...]`` as ``[uncond; cond]`` with
            ``guidance_scale``, else ``[B, ...]``; the sample's per-row shape, dtype and device. For
            DDPMScheduler with ``variance_type="learned_range"`` each half carries 2C channels (noise, then
            variance); the cond half's variance is used.
        timestep: the current value of ``scheduler.timesteps`` (a number or a one-element tensor; for
            Euler / Euler ancestral not an integer index, as diffusers requires).
        sample: ``[B, ...]`` floating-point latents x_t, at least 2-D (computed in fp32, stored in its
            dtype).
        scheduler: keyword only; a supported diffusers scheduler after ``set_timesteps``:
            ``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
            ``EulerAncestralDiscreteScheduler``, ``DPMSolverMultistepScheduler`` (``dpmsolver++`` or
            ``sde-dpmsolver++``, order 1, 2 or 3), ``UniPCMultistepScheduler`` (``bh1`` / ``bh2``, order 1 or
            2 with its corrector, ``predict_x0=True``, no ``solver_p``; ``guidance=`` on VP sigmas without x0
            classifiers, not inside ``torch.compile``), ``LCMScheduler``, ``FlowMatchEulerDiscreteScheduler``
            (velocity ``model_output``; ``shift``, dynamic shifting with ``set_timesteps(..., mu=...)``,
            ``shift_terminal``, ``invert_sigmas``, ``stochastic_sampling``, Karras / exponential / beta sigmas
            and custom sigmas all come from its ``sigmas``; latents of any shape, ``[B, C, H, W]`` or
            token-shaped ``[B, L, D]``), ``FlowMatchHeunDiscreteScheduler`` (``shift``; both stages, each call
            taking the stage the scheduler is in and keeping its ``prev_derivative`` / ``dt`` / ``sample`` as
            its own step does; ``guidance=`` without x0 classifiers, not inside ``torch.compile``). Anything
            else raises ``ValueError`` naming the scheduler or the config option.
        guidance_scale: CFG scale w: a float >= 0 or a ``[B]`` float tensor (per-sample); default None (no CFG,
            ``model_output`` has B rows).
        guidance_rescale: float in [0, 1], default 0: diffusers' ``rescale_noise_cfg`` phi; needs
            ``guidance_scale``.
        generator: None (default; torch's global RNG), a ``torch.Generator``, or a list of B generators (one
            per sample), on the CPU or the sample's device type, as diffusers takes it (a CPU generator with
            CUDA latents draws on the CPU and copies).
        eta: float >= 0, default 0: DDIMScheduler's ``eta``.
        use_clipped_model_output: bool, default False: DDIMScheduler's option of that name.
        s_churn: float >= 0, default 0; s_tmin: default 0; s_tmax: default inf; s_noise: default 1:
            the churn options of EulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler (sigma units).
        out: optional tensor of the sample's shape, dtype and device, default None: receives the result (it
            may be ``sample`` itself).
        guidance: sequence of ``ClassifierGuidance`` / ``DiscriminatorGuidance`` specs, default ``()``; needs
            ``y`` for classifiers. DDPMScheduler shifts the mean by ``Sigma g`` (ADM ``condition_mean``;
            Ma et al.'s x0-input recipe, which needs DDPM here, flow matching aside), the others correct the score
            (``eps -= sigma g``). The networks see the VP view of the state and the scheduler's timestep.
            On FlowMatchEulerDiscreteScheduler the state is ``x = (1 - s) x0 + s eps`` (alpha = 1 - s,
            sigma = s), the correction is ``v -= s / (1 - s) g``, the networks see the state itself and
            ``t = s T`` (an ``input="x0"`` classifier sees ``x0^ = x - s v``, its gradient entering alike),
            a discriminator's window is in s, and the step at s = 1 (pure noise: the coefficient is infinite,
            the gradient 0) is not guided; ``invert_sigmas=True`` refuses guidance.
            CFG goes in ``guidance_scale``, not here. Not traceable by ``torch.compile``.
        y: ``[B]`` tensor of target labels (or any per-sample condition) on the sample's device, default None.
        check_finite: bool, default False: raise ``ValueError`` on NaN/Inf in ``model_output`` (read on the host,
            so only for CPU tensors; skipped on a GPU, where it would sync).
        backend: ``"auto"`` (default: the fastest built backend that runs on the sample's device, C++ then
            torch on the CPU, CUDA then Triton then torch on a GPU), or ``"torch"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``.
        noise: optional tensor of the sample's shape and dtype, default None: used instead of drawing from
            ``generator`` on steps that draw noise (needed inside ``torch.compile`` for a seeded loop; for
            ``sde-dpmsolver++`` it is DPMSolverMultistepScheduler's ``variance_noise``).
        return_dict: None (default), False or True. Left unset, fastguide's convenience: the ``prev_sample``
            tensor itself. ``False``: exactly the tuple ``scheduler.step(..., return_dict=False)`` returns
            (``(prev_sample, pred_original_sample)``; DPMSolverMultistepScheduler, UniPCMultistepScheduler:
            ``(prev_sample,)``;
            LCMScheduler: ``(prev_sample, denoised)``, one more fused pass for ``denoised``), so
            ``...step(..., return_dict=False)[0]`` is the sample. ``True``: the scheduler's own output class
            (``DDIMSchedulerOutput``, ``SchedulerOutput`` for DPM-Solver and UniPC, ``LCMSchedulerOutput``,
            ``FlowMatchEulerDiscreteSchedulerOutput`` (``prev_sample`` only) ...; ``StepOutput`` for a
            scheduler whose module defines none).
        guider: a diffusers guider instance, default None, instead of ``guidance_scale``/``guidance_rescale``
            (``ClassifierFreeGuidance``, ``ClassifierFreeZeroStarGuidance``, ``AdaptiveProjectedGuidance``,
            ``AdaptiveProjectedMixGuidance``, ``MagnitudeAwareGuidance``, ``TangentialClassifierFreeGuidance``)
            after ``guider.set_state(step=i, num_inference_steps=N, timestep=t)``: the result is
            ``scheduler.step(guider.forward(c, u).pred, ...)`` and the guider's state advances alike; 2B
            rows when the guider guides the step, else B (``fastguide.dropin.guiders``).

    Returns ``prev_sample`` (the tensor ``out`` when given), or the tuple / output object asked for.
    Timesteps: DDIMScheduler takes any integer training timestep (as its own step does; one outside
    ``scheduler.timesteps`` gets its own row, built on first use: eagerly only, not inside
    ``torch.compile``); the other schedulers take the values of ``scheduler.timesteps`` (LCMScheduler, which
    reads both its step index and the timestep, the one at its step index: another is a ``ValueError``).
    Precision: the coefficient rows are computed in float64 from the scheduler's arrays and rounded once,
    where diffusers computes them in float32, so results can differ from diffusers' by its own fp32 rounding
    (e.g. ~5e-5 relative in DDPM's first betas). FlowMatchEulerDiscreteScheduler's stochastic noise and
    DPM++ SDE's noise are drawn in float32 as there (the generator advances alike) and rounded to a
    half-precision sample's dtype.

    Speed: a loop's repeat calls with the same shapes, dtypes and scale skip the argument checks; for a step that
    is one fused pass (DDIMScheduler with eta 0, EulerDiscreteScheduler without churn,
    FlowMatchEulerDiscreteScheduler without stochastic sampling; C++ backend) such calls without ``guider``,
    ``guidance``, ``noise`` or ``check_finite`` also run straight from the kernel's filled argument block
    (``fastguide.dropin.repeat``), with the same results.

    Every argument is checked, and the guidance networks run (their outputs checked: a wrong shape is a
    ``ValueError`` naming the network and the expected shape), before ``generator``, ``out`` or the scheduler
    is touched: a failing call leaves them as they were.

    Inside ``torch.compile(fullgraph=True)`` the step traces without graph breaks once the scheduler's
    tables exist (``fastguide.dropin.prepare(scheduler, device)``, or one eager call): DDPM/DDIM find a
    timestep tensor's row on the device (the timestep is then trusted to be in the schedule); index-based
    schedulers (Euler, Euler ancestral, DPM-Solver++, flow matching Euler) take the step index from fastguide's own
    counter, which ``prepare`` sets (from the scheduler's step or begin index, else 0) and each step advances
    together with the scheduler's ``step_index``. Dynamo traces that counter as a symbolic integer (fastguide
    adds its name, and only its name, to ``torch.compiler.config.dynamic_sources``), so one graph serves every
    step (DPM-Solver++ 2M: four, for its first, second, middle and final steps; 3M six: its three warm-up
    steps, the middle, the second-to-last and the final). Noise must come as ``noise=`` (or
    ``generator=None``, drawn by the compiled code's own RNG); ``guidance=`` is not traced.

    >>> scheduler.set_timesteps(50)
    >>> for t in scheduler.timesteps:
    ...     x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    ...     noise_pred = unet(x_in, t, encoder_hidden_states=embeds).sample      # [uncond; cond]
    ...     latents = fastguide.step(noise_pred, t, latents, scheduler=scheduler, guidance_scale=7.5,
    ...                              generator=generator, out=latents)
    """
    if return_dict is not None:
        check_bool("return_dict", return_dict)
    guide = None
    if (guidance or y is not None) and torch.compiler.is_compiling():
        raise RuntimeError("fastguide.step(guidance=...) does not run inside torch.compile; compile the network "
                           "alone, or use fastguide.sample(..., compile='inductor') for guided loops")
    state = scheduler_state(scheduler)
    options = _check_scheduler_options(scheduler, state.kind, eta, use_clipped_model_output,
                                       (s_churn, s_tmin, s_tmax, s_noise))
    output_class, fields = output_of(scheduler, state.kind) if return_dict is not None else (None, ())
    want_x0 = return_dict is not None and len(fields) > 1
    if guider is None and not guidance and y is None and noise is None and not check_finite:
        done = _repeat.run(model_output, timestep, sample, scheduler, state, options, guidance_scale,
                           guidance_rescale, generator, out, want_x0, backend)
        if done is not None:
            return _returned(*done, return_dict, output_class, fields)
    if guidance or y is not None:
        guide = _guide_of(scheduler, state, guidance, y, sample, timestep, backend)
    fused = _guiders.Fused(model_output)
    if guider is not None:
        if guidance_scale is not None or guidance_rescale != 0.0:
            raise ValueError("guider= replaces guidance_scale / guidance_rescale: pass one or the other")
        fused = _guiders.translate(guider, model_output, sample, scheduler, backend)
    prev, x0 = scheduler_step(fused.model_output, timestep, sample, scheduler=scheduler,
                              guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator,
                              options=options, out=out, backend=backend, want_x0=want_x0, guide=guide,
                              check_finite_output=check_finite, noise=noise, combine=fused.combine, extra=fused.extra,
                              state=state)
    fused.commit()
    return _returned(prev, x0, return_dict, output_class, fields)


def _returned(prev: torch.Tensor, x0: Optional[torch.Tensor], return_dict: Optional[bool],
              output_class: Optional[type], fields: Tuple[str, ...]):
    """What ``step`` returns: ``prev`` itself, or the tuple / output object ``scheduler.step`` returns."""
    if return_dict is None:
        return prev
    values = {"prev_sample": prev, "pred_original_sample": x0, "denoised": x0}
    if not return_dict:
        return tuple(values[f] for f in fields)
    if output_class is None:
        return StepOutput(prev_sample=prev, pred_original_sample=x0)
    return output_class(**{f: values[f] for f in fields})
