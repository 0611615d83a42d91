"""fastguide: fused, sync-free guided diffusion sampling for PyTorch."""

from .dispatch import backends
from .ops import guided_step, per_sample_rms, temperature_lse_grad
from .schedule import Schedule

__version__ = "0.1.0"
