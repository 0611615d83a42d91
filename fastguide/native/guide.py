"""How a native loop's stage runs its CFG-like spec (``fastguide.guidance.plan.GuidanceMethod``).

What each method costs per guided stage, besides the fused step (``StageKind.combine`` / ``perturbed`` /
``zero_init``, fixed when the loop is built, so stages of one kind run one code path):

* ``CFG``: one forward over ``[uncond; cond]`` (``[null; y]`` labels; two calls without a null label);
  the step combines ``u + w (c - u)`` (``scale``), with CFG rescale.
* ``CFGPlusPlus``: the same forward and combine (``w`` = the paper's lambda), eps~ from u
  (``eps_from_uncond``), on the CFG++ rows (``fastguide.samplers.native.cfg_pp_rows``).
* ``CFGZeroStar``, ``APG``, ``MamboG``, ``TCFG``, ``PerturbedGuidance`` (``fastguide.guidance.modern``):
  the same forward, then ``guidance_gram`` (one pass over the predictions: per-sample inner products),
  ``modern.coefficients`` (``[B]``-sized device ops, no host sync) and the step with ``combine`` (and
  ``extra``). Their CFG rescale factor is folded into the combine (``r m = (r a) c + (r b) u + (r d) e``).

  - APG with momentum: e is the running average, a ``[B, ...]`` device buffer of the sample's dtype that
    ``run_loop`` zeroes at the loop's start (inside a captured graph, so every replay starts from zeros)
    and ``guidance_gram`` updates in place to ``(c - u) + beta e`` on the guided stages only (diffusers'
    ``MomentumBuffer``).
  - ``PerturbedGuidance``: e is the perturbed prediction p, ``m = u + w (c - u) + s (c - p)``. With a
    ``perturbed_model`` (a PAG-modified copy of the model, a skip-layer variant, or autoguidance's weaker
    model) p = ``perturbed_model(x, t, y)``, called like the model (same input, timesteps and labels,
    B rows; only its prediction channels are used). Without one, the model's own forward gets a third
    block, ``[x; x; x]`` with labels ``[null; y; y]`` (diffusers' PAG batch order ``[uncond, cond,
    perturbed]``: a PAG-patched model perturbs the last third of its batch); that needs a null label
    (without one such a spec is refused when the loop is built).
  - ``CFGZeroStar``'s zero-init steps (``zero_init_steps``) have prediction 0 whatever the networks say, so
    they call none: the step runs on a zero model output (the cond half alone only where a DDPM
    learned-range step needs its variance channels).
  - The modern specs carry no null label: their uncond half is a second call ``model(x, t, None)``, as
    ``CFG(null_label=None)``'s; a spec with a ``null_label`` attribute gets the one-call ``[null; y]`` batch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core import ops
from ..core.checks import check_scale
from ..guidance import modern
from ..guidance.specs import CFG, CFGPlusPlus


def call_scale(spec, batch: int, device: torch.device) -> torch.Tensor:
    """This call's ``[B]`` fp32 scale of the CFG-like ``spec``, checked once before the loop (a device
    tensor's values too: one sync up front, none in the loop). CFG: finite, >= 0; CFG++: in [0, 1] (its
    lambda); the modern specs: any finite value, as their specs take."""
    name = "CFG scale" if isinstance(spec, CFG) else f"{type(spec).__name__} scale"
    scale = spec.scale
    if isinstance(spec, (CFG, CFGPlusPlus)):
        w = check_scale(name, scale, batch, device, sync_ok=True)
        if isinstance(spec, CFGPlusPlus) and isinstance(scale, torch.Tensor) and not bool((w <= 1).all()):
            raise ValueError(f"{name} (CFG++'s lambda) must lie in [0, 1], got {w.tolist()}")
        return w
    if isinstance(scale, torch.Tensor):  # shape, device, dtype and finiteness, whatever the sign
        check_scale(name, scale.detach().abs(), batch, device, sync_ok=True)
        return (scale.reshape(1).expand(batch) if scale.dim() == 0 else scale).float()
    value = float(scale)
    if value >= 0:
        return check_scale(name, value, batch, device)
    return torch.full((batch,), value, dtype=torch.float32, device=device)


StepTerms = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], bool]


def step_terms(kind, method, out: torch.Tensor, e: Optional[torch.Tensor], state: Optional[torch.Tensor],
               cfg_scale: Optional[torch.Tensor], x: torch.Tensor, learned: bool, backend: str) -> StepTerms:
    """The fused step's ``(scale, combine, extra, eps_from_uncond)`` for one stage of ``kind``: ``out`` is the
    model output (``[uncond; cond]`` on a guided stage), ``e`` the perturbed prediction (or None), ``state``
    APG's running-average buffer (or None), ``x`` the state. Device ops only."""
    if not kind.cfg:
        return None, None, None, False
    if kind.combine != "gram":
        return cfg_scale, None, None, kind.combine == "cfgpp"
    extra = state if method.momentum is not None else e
    if method.gram:
        gram = ops.run_gram(out, extra, method.momentum, learned, backend)  # (a traced call zero-fills extra=None)
    else:
        # PerturbedGuidance without rescale reads no inner product; coefficients takes a [B, 9] tensor for
        # its device, dtype and batch all the same: a view of the scale, never read.
        gram = cfg_scale.reshape(-1, 1).expand(-1, 9)
    # Zero-init is resolved when the loop is built (StageKind.zero_init); any step past it combines alike.
    combine, factor = modern.coefficients(method.spec, gram, cfg_scale, x[0].numel(), method.zero_init_steps)
    if factor is not None:
        combine = combine * factor.reshape(-1, 1)
    return None, combine, extra if method.extra else None, False
