"""fastguide: fused, sync-free guided diffusion sampling for PyTorch.

>>> import fastguide
>>> x = fastguide.sample(model, torch.randn(4, 3, 32, 32), schedule=fastguide.Schedule.ddpm(),
...                      sampler="ddim", steps=50, y=labels, guidance=[fastguide.CFG(3.0, null_label=1000)])

The tree (``docs/architecture.md`` has the map): ``core`` (the row contract, argument checks, the checked
ops), ``backends`` (torch reference, C++, Triton, CUDA), ``samplers`` (schedules and coefficient tables),
``guidance`` (specs and gradients), ``native`` (the ``sample`` loop), ``dropin`` (the diffusers ``step``),
``generation`` (``fastguide generate`` / ``evaluate``: seeded, resumable sets on torch.distributed),
``tools`` (CLI, benchmarks, op counter), ``examples``; ``training`` and ``calibration`` for users' models.
"""

from . import samplers
from .backends.dispatch import backends
from .core.ops import guidance_gram, guided_step, per_sample_rms, temperature_lse_grad
from .dropin import StepOutput, step
from .guidance import CFG, ClassifierGuidance, DiscriminatorGuidance, smooth
from .guidance.modern import APG, TCFG, CFGZeroStar, MamboG, PerturbedGuidance
from .guidance.specs import CFGPlusPlus
from .native import sample
from .samplers.schedule import Schedule

__version__ = "0.1.0"

__all__ = ["APG", "CFG", "CFGPlusPlus", "CFGZeroStar", "ClassifierGuidance", "DiscriminatorGuidance", "MamboG",
           "PerturbedGuidance", "Schedule", "TCFG", "backends", "guided_step", "guidance_gram", "per_sample_rms",
           "sample", "samplers", "smooth", "step", "StepOutput", "temperature_lse_grad"]
