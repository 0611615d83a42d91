"""The coefficient-row contract shared by every backend.

Every supported sampler step is one linear combination (docs/architecture.md). A step is described by one row of
``NUM_COLS`` float32 coefficients; a whole sampler run is a ``[steps, NUM_COLS]`` table that lives on the
device. With ``m`` the (CFG-combined, optionally rescaled) model output, ``x`` the current state,
``g`` the score-correction gradient, ``gm`` the mean-shift gradient, ``z`` the noise and ``x0_prev`` the
previous step's x0-prediction (``x0_prev2``: the one before it), a step computes, element-wise and in fp32::

    x0_raw = P_X*x + P_M*m + P_Z*z
    x0^    = clip(x0_raw) + P_G*g          # clip: none | [lo, hi] | per-sample threshold s: clamp(., -s, s)/s
    eps~   = Q_X*x + Q_M*m + Q_Z*z + Q_G*g
    Sigma  = exp(f*LV_MAX + (1-f)*LV_MIN),  f = (v+1)/2     # only with a learned-range variance output v
    out    = A*x + B*x0^ + C*eps~ + (D + DV*Sigma)*gm + (E + EV*sqrt(Sigma))*z + F*x0_prev + F2*x0_prev2

The score correction enters after clipping, as in guided-diffusion's ``condition_score``
(clip x0, derive eps, ``eps -= sqrt(1-abar)*g``, recompute x0). Terms whose tensor is absent are skipped,
never multiplied by zero, so an unused input can never inject NaN.
"""

from __future__ import annotations

from enum import IntEnum


class Col(IntEnum):
    """Column index of each coefficient in a step row (the order is part of the kernel ABI)."""

    P_X = 0
    P_M = 1
    P_G = 2
    P_Z = 3
    Q_X = 4
    Q_M = 5
    Q_G = 6
    Q_Z = 7
    A = 8
    B = 9
    C = 10
    D = 11
    E = 12
    F = 13
    DV = 14
    EV = 15
    LV_MAX = 16
    LV_MIN = 17
    F2 = 18      # x0_prev2: third-order multistep history (appended, so the older columns keep their index)


NUM_COLS = len(Col)

# Clip modes understood by every backend.
CLIP_NONE = 0
CLIP_RANGE = 1
CLIP_THRESHOLD = 2
