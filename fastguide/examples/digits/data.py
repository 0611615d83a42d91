"""The scikit-learn digits (1,797 8x8 images, offline) with a fixed held-out split and the [-1, 1] scaling.

Pixels are integers 0..16 in scikit-learn; samples live in [-1, 1] as ``x = pixel / 8 - 1``. The split is
stratified and seeded with a NumPy ``default_rng`` permutation (independent of scikit-learn's splitter), so
the same 20% of every class is held out everywhere: training never sees it, the demo's Fréchet distance and
the calibration measurements use it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import numpy as np
import torch

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
PIXEL_MAX = 16.0
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _raw() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float64), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def split_indices() -> Tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices into ``load_digits()``: 20% of each class held out, seed 0."""
    _, labels = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        n_held = int(round(HELD_OUT_FRACTION * len(rows)))
        held.append(rows[:n_held])
        train.append(rows[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def from_sklearn(pixels: np.ndarray) -> torch.Tensor:
    """[N, 64] pixels on scikit-learn's 0..16 scale -> [N, 1, 8, 8] float32 samples in [-1, 1]."""
    pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(pixels / (PIXEL_MAX / 2) - 1.0)


def to_sklearn(x: torch.Tensor) -> np.ndarray:
    """Samples [N, 1, 8, 8] in [-1, 1] -> an [N, 64] float64 array on scikit-learn's 0..16 pixel scale.

    Values are clipped to [0, 16] (samples may overshoot [-1, 1] slightly) but not rounded, so evaluators
    see what the sampler produced.

    >>> feats = to_sklearn(fastguide.sample(...))      # feed to any scikit-learn digits model
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"x must be a [N, 1, 8, 8] tensor of digits samples, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    pixels = (x.detach().double().cpu().numpy().reshape(len(x), -1) + 1.0) * (PIXEL_MAX / 2)
    return np.clip(pixels, 0.0, PIXEL_MAX)


def load_train() -> Tuple[torch.Tensor, torch.Tensor]:
    """The training split: images [N, 1, 8, 8] in [-1, 1] and labels [N] (int64)."""
    pixels, labels = _raw()
    train, _ = split_indices()
    return from_sklearn(pixels[train]), torch.from_numpy(labels[train])


def load_real() -> Tuple[torch.Tensor, torch.Tensor]:
    """The held-out real digits: images [N, 1, 8, 8] in [-1, 1] and labels [N] (int64), N = 359.

    >>> x, y = digits.load_real()
    """
    pixels, labels = _raw()
    _, held = split_indices()
    return from_sklearn(pixels[held]), torch.from_numpy(labels[held])


def train_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The training split on scikit-learn's scale: pixels [N, 64] (0..16) and labels [N]."""
    pixels, labels = _raw()
    train, _ = split_indices()
    return pixels[train], labels[train]


def held_out_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The held-out split on scikit-learn's scale: pixels [N, 64] (0..16) and labels [N]."""
    pixels, labels = _raw()
    _, held = split_indices()
    return pixels[held], labels[held]
