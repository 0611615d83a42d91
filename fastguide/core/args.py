"""The fused step's argument block: one object carried from the entry points down to every backend.

The public ``fastguide.guided_step`` and the ``torch.library`` op take flat arguments; everything between
them and the kernels (``fastguide.core.ops.run_step``, the torch reference, the C++/CUDA argument blocks of
``fastguide.backends.abi``, the Triton launcher) takes a ``StepArgs``. Adding an input to the step means
one field here plus its use in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .layout import CLIP_NONE

StepIndex = Union[int, torch.Tensor]


@dataclass(eq=False, slots=True)
class StepArgs:
    """The checked arguments of one fused guided step (the row formula of ``fastguide.core.layout``).

    ``model_output`` has 2B rows ``[uncond; cond]`` when ``scale`` is set, else B rows; with
    ``learned_variance`` its channel dimension is doubled (ADM's learned-range output). ``step`` is a host
    int or a one-element integer device tensor (a loop's step counter). ``out`` receives the step result,
    ``x0_out`` the predicted x0; a backend given ``out=None`` computes x0 only. ``out2`` (optional, the
    sample's shape and dtype) receives the result a second time, in the same pass over memory: a sampling
    loop points ``out`` and ``out2`` at the two halves of the next model call's ``[x; x]`` input instead of
    concatenating afterwards. It is written only together with ``out``; where ``out2`` and ``x0_out`` are
    the same tensor, the result wins (as it does for ``out``).

    Heterogeneous batches (a serving engine's iteration, where every sample is at its own step of its own
    sampler): ``step_rows`` ([B] int64) gives each sample its own row of ``table`` (a stack of several
    samplers' tables) and overrides ``step``. ``uncond_rows`` ([B] int64, with ``scale``) makes the CFG
    batch sparse: ``model_output`` then has ``B + K`` rows, row b is sample b's cond prediction and row
    ``uncond_rows[b]`` (in ``[B, B + K)``) its uncond prediction, or -1 when sample b has none (its guided
    output is then its cond prediction exactly, whatever its scale). The cond row's learned variance is used.

    Guidance methods beyond CFG (``fastguide.guidance.modern``): ``combine`` ([B, 3] fp32, with the dense
    ``[uncond; cond]`` layout and no ``scale``) gives each sample its own linear combination
    ``m = a c + b u + d e`` of the cond and uncond predictions and of ``extra`` (the sample's shape; the d
    term only when given). Every such method (CFG-Zero*, APG, MAMBO-G, TCFG, perturbed-branch guidance) is
    one ``combine`` computed from per-sample inner products (``guidance_gram``). ``eps_from_uncond``
    computes eps~ from u instead of m (CFG++: the update renoises with the unconditional prediction).

    ``outputs_disjoint`` is a caller's promise that ``out``, ``out2`` and ``x0_out`` are contiguous tensors of
    the sample's dtype sharing no memory with any input or with each other (a sampling loop's own buffers):
    ``run_step`` then skips its aliasing analysis, ~10 us of host time per step on a CPU.

    An instance belongs to one call: ``run_step`` fills in ``mfactor`` (from ``rescale``) and may point
    ``out``/``x0_out`` at temporaries for the kernel.

    >>> args = StepArgs(x, torch.cat([eps_u, eps_c]), table, 3, scale=w, out=torch.empty_like(x))
    >>> fastguide.backends.reference.guided_step(args)
    """

    sample: torch.Tensor
    model_output: torch.Tensor
    table: torch.Tensor                       # [steps, NUM_COLS] fp32, contiguous
    step: StepIndex
    scale: Optional[torch.Tensor] = None      # [B] fp32 CFG scale (any stride); None: no CFG
    rescale: float = 0.0                      # CFG rescale phi (Lin et al.); needs ``scale``
    mfactor: Optional[torch.Tensor] = None    # [B] fp32 factor on the combined output (from ``rescale``)
    g_score: Optional[torch.Tensor] = None    # score correction: eps -= sigma g
    g_mean: Optional[torch.Tensor] = None     # mean shift: mu += Sigma g
    noise: Optional[torch.Tensor] = None
    x0_prev: Optional[torch.Tensor] = None    # the previous step's x0 (2nd-order multistep samplers)
    x0_prev2: Optional[torch.Tensor] = None   # the x0 before that (3rd-order multistep, UniPC's corrector)
    clip_mode: int = CLIP_NONE
    clip_lo: float = -1.0
    clip_hi: float = 1.0
    threshold: Optional[torch.Tensor] = None  # [B] per-sample dynamic threshold (clip_mode THRESHOLD)
    learned_variance: bool = False
    out: Optional[torch.Tensor] = None
    x0_out: Optional[torch.Tensor] = None
    write_out: bool = True                    # False: x0 only (needs x0_out)
    out2: Optional[torch.Tensor] = None       # a second copy of the result (written only with out)
    step_rows: Optional[torch.Tensor] = None  # [B] int64: per-sample table row (overrides step)
    uncond_rows: Optional[torch.Tensor] = None  # [B] int64: sample b's uncond row of model_output, or -1
    combine: Optional[torch.Tensor] = None    # [B, 3] fp32 (a, b, d): m = a c + b u + d e, replacing u + w (c - u)
    extra: Optional[torch.Tensor] = None      # e: a third prediction (APG's running average, a perturbed branch)
    eps_from_uncond: bool = False             # eps~ from the uncond prediction u, x0^ from m (CFG++)
    outputs_disjoint: bool = False            # the caller guarantees out/out2/x0_out overlap no input

    @property
    def batch(self) -> int:
        return self.sample.shape[0]
