"""fastguide: fused, sync-free guided diffusion sampling for PyTorch.

>>> import fastguide
>>> x = fastguide.sample(model, torch.randn(4, 3, 32, 32), schedule=fastguide.Schedule.ddpm(),
...                      sampler="ddim", steps=50, y=labels, guidance=[fastguide.CFG(3.0, null_label=1000)])
"""

from . import samplers
from .dispatch import backends
from .dropin import StepOutput, step
from .guidance import CFG, ClassifierGuidance, DiscriminatorGuidance, smooth
from .ops import guided_step, per_sample_rms, temperature_lse_grad
from .sample import sample
from .schedule import Schedule

__version__ = "0.1.0"

__all__ = ["CFG", "ClassifierGuidance", "DiscriminatorGuidance", "Schedule", "backends", "guided_step",
           "per_sample_rms", "sample", "samplers", "smooth", "step", "StepOutput", "temperature_lse_grad"]
