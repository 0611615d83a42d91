"""The digits diffusion setup shared by training, the shipped bundle and the demo."""

from __future__ import annotations

import fastguide

# Cosine schedule (Nichol & Dhariwal 2021: better than linear at low resolution) over 1000 training steps;
# guided-diffusion respacing of the sampling steps; eps prediction.
NUM_TRAIN_TIMESTEPS = 1000
SAMPLER = "ddpm"
STEPS = 25
VARIANCE_TYPE = "fixed_small"
CLIP = (-1.0, 1.0)


def make_schedule() -> fastguide.Schedule:
    """The digits schedule: VP, cosine betas, 1000 training steps, guided-diffusion respacing."""
    return fastguide.Schedule.ddpm(NUM_TRAIN_TIMESTEPS, beta_schedule="cosine", variance_type=VARIANCE_TYPE,
                                   timestep_spacing="guided")
