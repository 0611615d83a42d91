"""Running a built loop: the code of one stage kind, and the driver over all stages.

Inside the loop there is no ``.item()``, no ``nonzero``, no tensor-valued Python branch and no host-to-device
copy; ``tests/test_native_loops.py`` audits that with a ``TorchDispatchMode`` over whole loops.

Noise: a stage draws its noise at its start, before any network of the stage runs (the churn noise first,
then the step noise), from the caller's generator(s) exactly as ``fastguide.core.noise.randn`` draws it.
Under ``torch.compile`` the draws stay outside the compiled body and enter it as inputs, so compiled and
eager loops see the same numbers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..core import ops
from ..core.args import StepArgs
from ..core.layout import CLIP_NONE, CLIP_RANGE
from ..core.noise import Generator, randn
from ..guidance.gradients import classifier_grad_core, discriminator_grad_core, edm_shift_core
from .guide import step_terms
from .spec import (FIXED_SCALAR_ROWS, ROW_C_IN, ROW_GUIDE_IN, ROW_PRE_NOISE, ROW_X0_FACTOR, LoopInputs, LoopSpec,
                   LoopTables, StageKind, takes_pair)


# ---------------------------------------------------------------------------------------------------
# One stage


_gather = torch.ops.aten.index.Tensor


def _at(table: torch.Tensor, counter) -> torch.Tensor:
    """Row ``counter`` of ``table``: for a host int (an eager loop) a view, like a diffusers loop's
    ``for t in scheduler.timesteps``; for a 0-dim int64 device tensor (a captured or compiled loop) one
    device-side gather. Not ``table[counter]`` for a tensor: Python indexing reads a 0-dim integer tensor on
    the host (a sync per step)."""
    if type(counter) is int:
        return table[counter]
    return _gather(table, [counter])


def _check_model_output(out, rows: int, x: torch.Tensor, learned: bool, name: str = "model") -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    expected = (rows, x.shape[1] * (2 if learned else 1)) + tuple(x.shape[2:])
    if tuple(out.shape) != expected:
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {expected}")
    return out


def _predictions(spec: LoopSpec, kind: StageKind, model: Callable, x: torch.Tensor, x_in: torch.Tensor, pair,
                 counter: torch.Tensor, t_model: torch.Tensor, t_model2: torch.Tensor, y, y_pair):
    """A stage's network calls: ``(model output, perturbed prediction or None)``. The output is
    ``[uncond; cond]`` on a guided stage (one call with a null label, else two), the cond prediction
    otherwise, zeros on a CFG-Zero* zero-init stage; a ``PerturbedGuidance`` stage also returns p, from its
    perturbed model or from a third block of the model's forward (``fastguide.native.guide``)."""
    rows, null_pair, e = x.shape[0], spec.null_label is not None, None
    if kind.zero_init:
        zeros = torch.zeros_like(x)
        if not spec.learned_step:
            return zeros, None
        out = _check_model_output(model(x_in, _at(t_model, counter), y), rows, x, True)
        return torch.cat([zeros, out[:, x.shape[1]:]], dim=1), None
    if kind.perturbed == "batch":  # [uncond; cond; perturbed] in one forward (a null label: GuidanceMethod)
        t3 = torch.cat([_at(t_model2, counter), _at(t_model, counter)])
        out = _check_model_output(model(torch.cat([x_in, x_in, x_in]), t3, y_pair), 3 * rows, x, spec.learned_model)
        out, e = out[: 2 * rows], out[2 * rows:, : x.shape[1]]
    elif kind.cfg:
        if null_pair:
            out = model(pair if pair is not None else torch.cat([x_in, x_in]), _at(t_model2, counter), y_pair)
        else:
            t = _at(t_model, counter)
            out = torch.cat([model(x_in, t, None), model(x_in, t, y)])
        out = _check_model_output(out, 2 * rows, x, spec.learned_model)
    else:
        out = _check_model_output(model(x_in, _at(t_model, counter), y), rows, x, spec.learned_model)
    if kind.perturbed == "model":
        p = spec.method.spec.perturbed_model(x_in, _at(t_model, counter), y)
        e = _check_model_output(p, rows, x, spec.learned_model, "perturbed_model")[:, : x.shape[1]]
    if spec.learned_model and not spec.learned_step:
        out = out[:, : x.shape[1]]  # only DDPM uses the learned variance channels
    return out, e


StageFn = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]


def make_stage(spec: LoopSpec, kind: StageKind, model: Callable, classifiers: Sequence,
               discriminators: Sequence, backend: str) -> StageFn:
    """The code of one stage kind: ``stage(x, x0_prev, z_pre, z_step, counter, tables, inputs, dest=None)``
    returns ``(x_next, x0 or None)``. Every per-stage number is read from ``tables`` at ``counter`` (a 0-dim
    int64 device tensor, or in an eager loop the stage index as a host int: ``stage.accepts_host_steps``),
    so one function serves every stage of its kind.

    Paired calls (``run_loop``, from ``spec.pair_out``; eager and CUDA-graph loops only, the function says
    so with ``stage.accepts_pairs``): given ``dest = pair_buffer(...)``, the fused step writes its result into
    both halves of ``dest`` and ``x_next`` is ``(pair, pair[:B])``; a stage whose kind ``takes_pair``
    accepts such a ``(pair, x)`` as its ``x`` and hands ``pair`` to the model as it is, so the CFG batch
    costs no ``torch.cat``."""
    clip_mode, lo, hi = (CLIP_RANGE, spec.clip[0], spec.clip[1]) if spec.clip is not None else (CLIP_NONE, -1.0, 1.0)
    rescale = spec.rescale if kind.cfg else 0.0
    disc_row = FIXED_SCALAR_ROWS
    edm_row = FIXED_SCALAR_ROWS + len(discriminators)
    x0_rows = {i: edm_row + j for j, i in enumerate(spec.x0_classifier_index)}
    accepts_pair = takes_pair(kind, spec.null_label)

    def step_args(x, out, coeffs, counter, terms, g_score, g_mean, z, x0_prev, x0_out, write_out=True,
                  dest=None, dest2=None):
        scale, combine, extra, eps_from_uncond = terms
        return StepArgs(x, out, coeffs, counter, scale=scale, rescale=rescale, g_score=g_score, g_mean=g_mean,
                        noise=z, x0_prev=x0_prev, clip_mode=clip_mode, clip_lo=lo, clip_hi=hi,
                        learned_variance=spec.learned_step, out=dest, x0_out=x0_out, write_out=write_out,
                        out2=dest2, combine=combine, extra=extra, eps_from_uncond=eps_from_uncond,
                        outputs_disjoint=True)  # fresh tensors, or the pair buffer the stage's inputs are not in

    def stage(x, x0_prev, z_pre, z_step, counter, tables, inputs, dest=None):
        # Nothing flows back into the denoiser (the guidance gradients enable grad for their own networks):
        # no autograd graph is kept for the model, and compiled stages return plain tensors. (An eager
        # ``run_loop`` already runs under no_grad.)
        if not torch.is_grad_enabled():
            return stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs, dest)
        with torch.no_grad():
            return stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs, dest)

    def stage_body(x, x0_prev, z_pre, z_step, counter, tables, inputs, dest):
        coeffs, t_model, t_model2, guide_t, scalars = tables
        y, y_pair, cfg_scale, classifier_scales, unit = inputs[:5]
        state = inputs[5] if len(inputs) > 5 else None  # APG's running average (run_loop)
        pair = None
        if type(x) is tuple:  # (the [x; x] model input the previous stage wrote, x)
            if not accepts_pair:
                raise ValueError("this stage's model does not see [x; x] (spec.takes_pair): pass x alone")
            pair, x = x
        if kind.edm_recipe or kind.xt_classifiers or kind.x0_classifiers or kind.discriminators:
            t_guide = _at(guide_t, counter)
            guide_in = _at(scalars[ROW_GUIDE_IN], counter) if kind.guide_scaled else None
        for i in kind.edm_recipe:
            x = x + edm_shift_core(classifiers[i], x, t_guide, y, _at(scalars[x0_rows[i]], counter), unit, backend)
        if kind.pre_noise:
            x = x + _at(scalars[ROW_PRE_NOISE], counter) * z_pre
        x_in = x * _at(scalars[ROW_C_IN], counter) if kind.scales_input else x
        out, e = _predictions(spec, kind, model, x, x_in, pair, counter, t_model, t_model2, y, y_pair)
        terms = step_terms(kind, spec.method, out, e, state, cfg_scale, x, spec.learned_step, backend)

        state_grad = None
        for i in kind.xt_classifiers:
            g = classifier_grad_core(classifiers[i], x, t_guide, y, classifier_scales[i], guide_in, backend)
            state_grad = g if state_grad is None else state_grad + g
        for j in kind.discriminators:
            g = discriminator_grad_core(discriminators[j], x, t_guide, guide_in, y,
                                        _at(scalars[disc_row + j], counter))
            state_grad = g if state_grad is None else state_grad + g
        g_score, g_mean = (None, state_grad) if spec.mean_shift else (state_grad, None)
        x0_prev_in = x0_prev if kind.uses_x0_prev else None
        if kind.x0_classifiers:
            # Ma et al.: the classifier sees x0^ (clipped like the step clips it); no backprop into the model.
            x0_hat = torch.empty_like(x)
            ops.run_step(step_args(x, out, coeffs, counter, terms, None, None, z_step, x0_prev_in,
                                   x0_hat, write_out=False), backend)
            for i in kind.x0_classifiers:
                g = classifier_grad_core(classifiers[i], x0_hat, t_guide, y, classifier_scales[i], None, backend)
                if kind.x0_factor and i == spec.factor_spec:
                    g = g * _at(scalars[ROW_X0_FACTOR], counter)
                if spec.x0_score:
                    g_score = g if g_score is None else g_score + g
                else:
                    g_mean = g if g_mean is None else g_mean + g
        x0_next = torch.empty_like(x) if kind.writes_x0 else None
        if dest is not None:
            # The fused step writes x_next into both halves of the next stage's model input [x_next; x_next].
            x_pair, lower, upper = dest
            ops.run_step(step_args(x, out, coeffs, counter, terms, g_score, g_mean, z_step, x0_prev_in,
                                   x0_next, dest=lower, dest2=upper), backend)
            return (x_pair, lower), x0_next
        x_next = ops.run_step(step_args(x, out, coeffs, counter, terms, g_score, g_mean, z_step, x0_prev_in,
                                        x0_next), backend)
        return x_next, x0_next

    stage.accepts_pairs = stage.accepts_host_steps = True
    return stage


def pair_buffer(like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``[2B, ...]`` buffer of ``like``'s shape, dtype and device and its halves: where a paired stage
    writes the next model input ``[x; x]``."""
    rows = like.shape[0]
    pair = like.new_empty((2 * rows,) + tuple(like.shape[1:]))
    return pair, pair[:rows], pair[rows:]


# ---------------------------------------------------------------------------------------------------
# Driving a whole loop


class NoiseSource:
    """Where a loop's noise comes from: drawn per stage from generator(s), or read from pre-drawn buffers."""

    def __init__(self, generator: Generator = None, predrawn: Optional[torch.Tensor] = None):
        self.generator = generator
        self.predrawn = predrawn
        self.index = 0

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        if self.predrawn is not None:
            z = self.predrawn[self.index]
            self.index += 1
            return z
        return randn(like.shape, self.generator, like.device, like.dtype)


def count_draws(spec: LoopSpec) -> int:
    """How many noise tensors of the sample's shape a loop draws."""
    return sum(int(k.pre_noise) + int(k.noise) for k in spec.kinds)


def predraw(spec: LoopSpec, generator: Generator, shape, device: torch.device,
            dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Every draw of a loop, in the loop's order, as one ``[draws, *shape]`` tensor on ``device``
    (what a CUDA graph reads when the caller's generators live on the CPU)."""
    draws = count_draws(spec)
    if not draws:
        return None
    return torch.stack([randn(shape, generator, device, dtype) for _ in range(draws)])


def run_loop(stages: Sequence[StageFn], spec: LoopSpec, x_T: torch.Tensor, tables: LoopTables,
             inputs: LoopInputs, noise: NoiseSource, counter: Optional[torch.Tensor] = None,
             progress: Optional[Callable] = None) -> torch.Tensor:
    """Run every stage: ``stages[k]`` is stage k's function (shared between stages of one kind).

    Stage functions that take host steps (``make_stage``'s, eager) get the stage index k as a Python int:
    their table reads are views and the fused step takes its row by number, with no counter to advance (the
    loop stays sync-free on a GPU too). Otherwise (compiled bodies, or a caller's ``counter``: a CUDA graph's
    buffer) a 0-dim int64 device counter starts at 0 and advances in place after each stage."""
    host_steps = counter is None and all(getattr(s, "accepts_host_steps", False) for s in set(stages))
    if counter is not None:
        counter.zero_()
    elif not host_steps:
        counter = torch.zeros((), dtype=torch.int64, device=x_T.device)
    x = x_T * spec.init_scale
    x0_prev = None
    table_args, input_args = tables.as_tuple(), inputs.as_tuple()
    if spec.method is not None and spec.method.momentum is not None:
        # APG's running average, zeroed here at every loop's start (a graph captures the zeroing too).
        input_args = input_args + (torch.zeros_like(x),)
    order = range(spec.num_stages)
    if progress is not None:
        order = progress(order)
    kinds = spec.kinds
    like = x  # the state's shape, dtype and device (between paired stages x is a (pair, state) tuple)
    # Paired stages (spec.pair_out) write the next model input into one of two buffers, alternately: stage k
    # reads the buffer stage k - 1 wrote and writes the other, so a step never writes what it (or its model)
    # reads, and a model's input stays intact until the call after next. Only stage functions that accept
    # the paired calling convention get it (make_stage's; compiled bodies run the plain loop).
    paired = spec.pair_out if spec.pair_out and all(getattr(s, "accepts_pairs", False) for s in set(stages)) \
        else ()
    buffers = (pair_buffer(like), pair_buffer(like)) if paired else None
    # add_(tensor): no scalar wrapped per step
    one = None if host_steps else torch.ones((), dtype=torch.int64, device=counter.device)
    with torch.no_grad():
        for k in order:
            kind = kinds[k]
            z_pre = noise.draw(like) if kind.pre_noise else None
            z_step = noise.draw(like) if kind.noise else None
            step = k if host_steps else counter
            if paired and paired[k]:
                x, x0_prev = stages[k](x, x0_prev, z_pre, z_step, step, table_args, input_args, buffers[k & 1])
            else:
                x, x0_prev = stages[k](x, x0_prev, z_pre, z_step, step, table_args, input_args)
            if not host_steps:
                counter.add_(one)
    return x
