"""One engine iteration: every active request advances one stage of its own loop, in one batch.

Each request carries the ``LoopSpec`` that ``fastguide.sample`` would run for it alone (built by
``fastguide.native.sampling.build_loop``, batch 1). An iteration does, for the requests' current stages
together, what ``fastguide.native.loop.make_stage`` does for one loop:

1. draw each request's noise from its own generator (``draw``; before any network runs, as the loop does),
2. EDM-recipe shifts and churn noise, then one model forward over ``[cond rows; the uncond rows needed]``
   with per-row timesteps and conditions (a request outside its CFG window, without CFG or at CFG scale 1
   adds no uncond row),
3. classifier and discriminator gradients, each network run once over the rows whose request asked for it
   (x0-input classifiers on x0^ from one x0-only step),
4. one fused step over the whole batch: each row reads its own row of a stacked coefficient table
   (``step_rows``) and finds its uncond row through a sparse map (``uncond_rows``).

So a request's sample equals its solo ``fastguide.sample`` run (same seed, same noise draws) to the
rounding of the network's batched arithmetic, whatever shares the batch. ``step_batch`` mutates nothing,
so the engine can retry a failed batch request by request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..backends import reference
from ..core import ops
from ..core.args import StepArgs
from ..core.cache import LRUCache
from ..core.layout import CLIP_NONE, CLIP_RANGE
from ..core.noise import randn
from ..guidance.gradients import classifier_grad_core, discriminator_grad_core, edm_shift_core
from ..native.spec import FIXED_SCALAR_ROWS, ROW_C_IN, ROW_GUIDE_IN, ROW_PRE_NOISE, ROW_X0_FACTOR, LoopSpec
from ..native.spec import identity as _identity


@dataclass
class Active:
    """A request in flight: its loop, its generator, its state and where it stands."""

    request: Any                       # fastguide.serve.requests.SampleRequest
    classifiers: Tuple[Any, ...]       # the guided plan's classifier specs, in the plan's order
    discriminators: Tuple[Any, ...]
    spec: LoopSpec
    table_key: bytes
    generator: torch.Generator
    x: torch.Tensor                    # [1, ...] the state
    y: Optional[torch.Tensor]          # [1] label (null for the unconditional model) or [1, ...] condition
    y_guide: Optional[torch.Tensor]    # [1] the class the guidance networks are asked about
    x0_prev: Optional[torch.Tensor] = None
    stage: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self):
        return self.spec.kinds[self.stage]

    @property
    def needs_uncond(self) -> bool:
        """Whether this stage needs an uncond prediction: CFG inside its window at a scale other than 1
        (``u + 1 (c - u)`` is ``c``, so scale-1 requests cost no uncond row)."""
        return self.kind.cfg and self.request.cfg_scale != 1.0

    @property
    def done(self) -> bool:
        return self.stage >= self.spec.num_stages


@dataclass
class Draws:
    """One request's noise for its current stage (None where the stage draws none)."""

    pre: Optional[torch.Tensor]
    step: Optional[torch.Tensor]


def draw(a: Active) -> Draws:
    """The stage's noise from the request's generator, in the loop's order (churn first, then the step's)."""
    kind = a.kind
    pre = randn(a.x.shape, a.generator, a.x.device, a.x.dtype) if kind.pre_noise else None
    step = randn(a.x.shape, a.generator, a.x.device, a.x.dtype) if kind.noise else None
    return Draws(pre, step)


class TableStack:
    """The coefficient tables of the requests in a batch, stacked into one device table; row ``offset(a) +
    a.stage`` of it is request ``a``'s current row. Stacks are cached by their set of tables."""

    def __init__(self, device: torch.device, capacity: int = 16):
        self.device = device
        self._stacks = LRUCache(capacity)

    def build(self, batch: Sequence[Active]) -> Tuple[torch.Tensor, List[int]]:
        keys: Dict[bytes, int] = {}
        blocks: List[np.ndarray] = []
        for a in batch:
            if a.table_key not in keys:
                keys[a.table_key] = sum(len(b) for b in blocks)
                blocks.append(a.spec.rows)
        stack = self._stacks.get_or_build(tuple(keys), lambda: torch.from_numpy(
            np.concatenate(blocks).astype(np.float32)).to(self.device))
        return stack, [keys[a.table_key] for a in batch]


@dataclass
class BatchContext:
    """What every iteration of one engine shares: the model, its conditions and the step's settings."""

    model: Callable[..., torch.Tensor]
    null_condition: Any                # the uncond rows' y (a label or a condition tensor of one row)
    clip: Optional[Tuple[float, float]]
    backend: str
    tables: TableStack
    learned_model: bool = False


def _column(values, like: torch.Tensor) -> torch.Tensor:
    """Per-row numbers as a float32 [B, 1, ...] tensor on ``like``'s device, broadcasting over a row."""
    t = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(like.device)
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _vector(values, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(device)


def _index(rows: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.long, device=device)


def _scalar(a: Active, row: int) -> float:
    return float(a.spec.scalars[row, a.stage])


def _cat_rows(tensors: Sequence[Optional[torch.Tensor]], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows stacked, zeros where a request has none; None when no request has one."""
    if all(t is None for t in tensors):
        return None
    zero = torch.zeros_like(like[:1])
    return torch.cat([t if t is not None else zero for t in tensors])


def _by_network(items: Sequence[Tuple[int, Any, float]], key: Callable) -> Dict[Any, List[Tuple[int, Any, float]]]:
    groups: Dict[Any, List[Tuple[int, Any, float]]] = {}
    for item in items:
        groups.setdefault(key(item[1]), []).append(item)
    return groups


def _guide_in(batch: Sequence[Active], rows: Sequence[int], like: torch.Tensor) -> Optional[torch.Tensor]:
    """The guidance networks' input scale per row (1 exactly where a stage has none), or None for none."""
    if not any(batch[r].kind.guide_scaled for r in rows):
        return None
    return _column([_scalar(batch[r], ROW_GUIDE_IN) if batch[r].kind.guide_scaled else 1.0 for r in rows], like)


def _labels(batch: Sequence[Active], rows: Sequence[int]) -> Optional[torch.Tensor]:
    ys = [batch[r].y_guide for r in rows]
    return None if any(y is None for y in ys) else torch.cat(ys)


def _classifier_key(spec) -> tuple:
    return (_identity(spec.classifier), spec.tau1, spec.tau2)


def _split_rows(grad: Optional[torch.Tensor], flags: Sequence[bool], x: torch.Tensor):
    """(``grad`` on the rows whose flag is set, ``grad`` on the others), None for a part with no rows."""
    if grad is None or all(flags):
        return grad, None
    if not any(flags):
        return None, grad
    rows, zero = _column(flags, x) > 0, torch.zeros_like(grad)
    return torch.where(rows, grad, zero), torch.where(rows, zero, grad)


def _sum(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else a if b is None else a + b


def _classifier_pass(batch, positions, inp: torch.Tensor, t_guide: torch.Tensor, backend: str, scaled: bool,
                     factor: Callable[[int, int], float]) -> Optional[torch.Tensor]:
    """Sum over the classifier specs each row names (``positions[r]``: indices into its classifiers, in its
    order) of their guidance gradients on ``inp``; every network runs once per position over its rows."""
    acc = None
    for p in range(max((len(ix) for ix in positions), default=0)):
        items = [(r, batch[r].classifiers[ix[p]], factor(r, ix[p])) for r, ix in enumerate(positions) if len(ix) > p]
        for group in _by_network(items, _classifier_key).values():
            rows = [r for r, _, _ in group]
            spec = group[0][1]
            idx = _index(rows, inp.device)
            w = _vector([s.scale for _, s, _ in group], inp.device)
            gin = _guide_in(batch, rows, inp) if scaled else None
            g = classifier_grad_core(spec, inp.index_select(0, idx), t_guide.index_select(0, idx),
                                     _labels(batch, rows), w, gin, backend)
            factors = [f for _, _, f in group]
            if any(f != 1.0 for f in factors):
                g = g * _column(factors, g).to(g.dtype)
            acc = torch.zeros_like(inp) if acc is None else acc
            acc.index_add_(0, idx, g)
    return acc


def _discriminator_pass(batch, x: torch.Tensor, t_guide: torch.Tensor) -> Optional[torch.Tensor]:
    """Sum of each row's discriminator gradients (the weights of its stage), one network call per group."""
    positions = [a.kind.discriminators for a in batch]
    acc = None
    for p in range(max((len(ix) for ix in positions), default=0)):
        items = [(r, batch[r].discriminators[ix[p]], _scalar(batch[r], FIXED_SCALAR_ROWS + ix[p]))
                 for r, ix in enumerate(positions) if len(ix) > p]
        for group in _by_network(items, lambda s: _identity(s.discriminator)).values():
            rows = [r for r, _, _ in group]
            idx = _index(rows, x.device)
            ys = [batch[r].y_guide if batch[r].y_guide is not None else batch[r].y for r in rows]
            y = None if any(v is None for v in ys) else torch.cat(ys)
            g = discriminator_grad_core(group[0][1], x.index_select(0, idx), t_guide.index_select(0, idx),
                                        _guide_in(batch, rows, x), y, _vector([w for _, _, w in group], x.device))
            acc = torch.zeros_like(x) if acc is None else acc
            acc.index_add_(0, idx, g)
    return acc


def _edm_shift(batch, x: torch.Tensor, t_guide: torch.Tensor, backend: str) -> torch.Tensor:
    """Ma et al.'s EDM-recipe shifts of the rows whose stage has them, applied in each row's spec order."""
    positions = [a.kind.edm_recipe for a in batch]
    for p in range(max((len(ix) for ix in positions), default=0)):
        items = []
        for r, ix in enumerate(positions):
            if len(ix) > p:
                a = batch[r]
                row = FIXED_SCALAR_ROWS + len(a.discriminators) + a.spec.x0_classifier_index.index(ix[p])
                items.append((r, a.classifiers[ix[p]], _scalar(a, row)))
        for group in _by_network(items, _classifier_key).values():
            rows = [r for r, _, _ in group]
            idx = _index(rows, x.device)
            weight = _vector([w for _, _, w in group], x.device)
            shift = edm_shift_core(group[0][1], x.index_select(0, idx), t_guide.index_select(0, idx),
                                   _labels(batch, rows), weight, torch.ones_like(weight), backend)
            x = x.index_add(0, idx, shift)
    return x


def _model_batch(batch, ctx: BatchContext, x_in: torch.Tensor, t: torch.Tensor):
    """One forward over [cond rows; uncond rows of the requests whose stage runs CFG], and the sparse map."""
    cfg_rows = [r for r, a in enumerate(batch) if a.needs_uncond]
    y = _cat_conditions([a.y for a in batch])
    uncond_map = [-1] * len(batch)
    if cfg_rows:
        idx = _index(cfg_rows, x_in.device)
        x_in = torch.cat([x_in, x_in.index_select(0, idx)])
        t = torch.cat([t, t.index_select(0, idx)])
        y = _cat_conditions([y, _null_rows(ctx.null_condition, len(cfg_rows), y)])
        for j, r in enumerate(cfg_rows):
            uncond_map[r] = len(batch) + j
    out = ctx.model(x_in, t, y)
    rows = x_in.shape[0]
    channels = batch[0].x.shape[1] * (2 if ctx.learned_model else 1)
    expected = (rows, channels) + tuple(batch[0].x.shape[2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model returned {got}, expected {expected}")
    return out, uncond_map, len(cfg_rows)


def _cat_conditions(parts):
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def _null_rows(null, count: int, like: Optional[torch.Tensor]) -> torch.Tensor:
    if isinstance(null, torch.Tensor):
        null = null.to(like.device, like.dtype)
        return null.expand((count,) + tuple(like.shape[1:])) if null.dim() < like.dim() else null.expand(
            (count,) + tuple(null.shape[1:]))
    return torch.full((count,), null, dtype=like.dtype if like is not None else torch.long,
                      device=like.device if like is not None else "cpu")


@dataclass
class StepResult:
    x: torch.Tensor                    # [B, ...] the next states
    x0: Optional[torch.Tensor]         # [B, ...] x0^ where a next stage needs it
    model_rows: int                    # rows of the model forward
    uncond_rows: int                   # of which uncond


def step_batch(batch: Sequence[Active], draws: Sequence[Draws], ctx: BatchContext) -> StepResult:
    """Advance every request of ``batch`` by its current stage; returns the next states (nothing mutated)."""
    kinds = [a.kind for a in batch]
    x = torch.cat([a.x for a in batch])
    t_model = _vector([a.spec.t_model[a.stage] for a in batch], x.device)
    t_guide = _vector([a.spec.guide_t[a.stage] for a in batch], x.device)
    if any(k.edm_recipe for k in kinds):
        x = _edm_shift(batch, x, t_guide, ctx.backend)
    if any(k.pre_noise for k in kinds):
        z_pre = _cat_rows([d.pre for d in draws], x)
        x = x + _column([_scalar(a, ROW_PRE_NOISE) for a in batch], x).to(x.dtype) * z_pre
    x_in = x * _column([_scalar(a, ROW_C_IN) for a in batch], x).to(x.dtype) if any(k.scales_input for k in kinds) \
        else x
    out, uncond_map, uncond_count = _model_batch(batch, ctx, x_in, t_model)
    learned_step = any(a.spec.learned_step for a in batch)
    if ctx.learned_model and not learned_step:
        out = out[:, : x.shape[1]]  # only DDPM uses the learned variance channels

    # Guidance gradients: xt classifiers and discriminators on the state (score or mean, per sampler).
    state = _classifier_pass(batch, [k.xt_classifiers for k in kinds], x, t_guide, ctx.backend, True,
                             lambda r, i: 1.0)
    disc = _discriminator_pass(batch, x, t_guide)
    if disc is not None:
        state = disc if state is None else state + disc
    g_mean, g_score = _split_rows(state, [a.spec.mean_shift for a in batch], x)

    args = _step_args(batch, draws, ctx, x, out, uncond_map, learned_step)
    if any(k.x0_classifiers for k in kinds):
        x0_hat = torch.empty_like(x)
        ops.run_step(_replace(args, out=None, x0_out=x0_hat, write_out=False), ctx.backend)

        def factor(r: int, i: int) -> float:
            a = batch[r]
            return _scalar(a, ROW_X0_FACTOR) if a.kind.x0_factor and i == a.spec.factor_spec else 1.0
        g_x0 = _classifier_pass(batch, [k.x0_classifiers for k in kinds], x0_hat, t_guide, ctx.backend, False,
                                factor)
        # A flow request's rows correct the score (LoopSpec.x0_score), the others shift the mean.
        score_part, mean_part = _split_rows(g_x0, [a.spec.x0_score for a in batch], x)
        g_score, g_mean = _sum(g_score, score_part), _sum(g_mean, mean_part)
    args.g_score, args.g_mean = g_score, g_mean
    x0_next = torch.empty_like(x) if any(k.writes_x0 for k in kinds) else None
    args.x0_out = x0_next
    x_next = ops.run_step(args, ctx.backend)
    return StepResult(x_next, x0_next, out.shape[0], uncond_count)


def _replace(args: StepArgs, **changes) -> StepArgs:
    from dataclasses import replace
    return replace(args, **changes)


def _step_args(batch, draws, ctx: BatchContext, x, out, uncond_map, learned_step: bool) -> StepArgs:
    """The heterogeneous fused step's arguments: per-row table rows, the sparse CFG map, per-row scales."""
    table, offsets = ctx.tables.build(batch)
    kinds = [a.kind for a in batch]
    step_rows = _index([o + a.stage for o, a in zip(offsets, batch)], x.device)
    scale = mfactor = uncond_rows = None
    if any(m >= 0 for m in uncond_map):
        scale = _vector([a.request.cfg_scale for a in batch], x.device)
        uncond_rows = _index(uncond_map, x.device)
        phi = [a.request.cfg_rescale if a.needs_uncond else 0.0 for a in batch]
        if any(phi):
            # Lin et al.'s factor for the rows that rescale; exactly 1 (no factor) for the others.
            phi_t = _vector(phi, x.device)
            factor = reference.cfg_rescale_factor(out, scale, phi_t, learned_step, uncond_rows)
            mfactor = torch.where(phi_t > 0, factor, torch.ones_like(factor))
    noise = _cat_rows([d.step for d in draws], x)
    x0_prev = _cat_rows([a.x0_prev if k.uses_x0_prev else None for a, k in zip(batch, kinds)], x)
    clip_mode, lo, hi = (CLIP_RANGE, ctx.clip[0], ctx.clip[1]) if ctx.clip is not None else (CLIP_NONE, -1.0, 1.0)
    return StepArgs(x, out, table, 0, scale=scale, mfactor=mfactor, noise=noise, x0_prev=x0_prev,
                    clip_mode=clip_mode, clip_lo=lo, clip_hi=hi, learned_variance=learned_step,
                    step_rows=step_rows, uncond_rows=uncond_rows)
