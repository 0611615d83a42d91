"""The four digits networks: small enough to train on a CPU in minutes, shaped like their ImageNet cousins.

* ``UNet`` — the class-conditional eps-prediction denoiser (ADM-style residual blocks with GroupNorm and a
  timestep + class embedding); label ``NULL_LABEL`` is the "no class" token learnt by CFG label dropout.
* ``NoisyClassifier`` — ADM's noisy classifier in miniature: the UNet's encoder half with the timestep
  embedding, a pooled linear head, trained on x_t at every training timestep.
* ``CleanClassifier`` — an ordinary ReLU CNN trained on clean digits only (the "off-the-shelf" classifier
  of Ma et al.); its ReLUs are ``nn.ReLU`` modules so ``fastguide.smooth`` can swap them for Softplus.
* ``Discriminator`` — the noisy classifier's architecture with one output logit and an optional class
  embedding, trained on real vs generated digits (Kim et al.).

All take images [B, 1, 8, 8] in [-1, 1]; ``t`` is a [B] tensor of training timesteps (0..999).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .data import IMAGE_SHAPE, NUM_CLASSES

NULL_LABEL = NUM_CLASSES  # the CFG "no class" label: one extra row of the class embedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim] (Vaswani et al.; ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between (ADM's residual block, no scale-shift)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class TimeEmbedding(nn.Module):
    """Timestep (and optionally class) embedding: sinusoid -> MLP, plus a learnt class vector."""

    def __init__(self, dim: int, num_labels: int = 0):
        super().__init__()
        self.base = dim // 2
        self.mlp = nn.Sequential(nn.Linear(self.base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.labels = nn.Embedding(num_labels, dim) if num_labels else None

    def forward(self, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.mlp(timestep_embedding(t, self.base))
        if self.labels is not None and y is not None:
            emb = emb + self.labels(y.long())
        return emb


class UNet(nn.Module):
    """Class-conditional eps-prediction UNet for 8x8 digits: 8x8 -> 4x4 -> 8x8 with skip connections.

    ``y`` holds labels 0..9 or ``NULL_LABEL`` (unconditional); ``y=None`` means all ``NULL_LABEL``.

    >>> unet = UNet(); eps = unet(x_t, t, y)      # x_t [B, 1, 8, 8], t [B], y [B]
    """

    def __init__(self, channels: Sequence[int] = (32, 64), emb_dim: int = 128):
        super().__init__()
        c1, c2 = channels
        self.embed = TimeEmbedding(emb_dim, NUM_CLASSES + 1)
        self.inp = nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb_dim)
        self.mid = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(c2 + c2, c2, emb_dim)
        self.unpool = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, IMAGE_SHAPE[0], 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start as the zero-eps predictor (ADM's zero_module)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
        emb = self.embed(t, y)
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = self.up1(torch.cat([self.unpool(h), h1], 1), emb)
        return self.out(h)


class NoisyClassifier(nn.Module):
    """ADM-style noisy classifier: ``classifier(x_t, t) -> logits [B, 10]``, timestep-conditioned.

    >>> logits = NoisyClassifier()(x_t, t)
    """

    def __init__(self, channels: Sequence[int] = (32, 64), emb_dim: int = 64, outputs: int = NUM_CLASSES,
                 num_labels: int = 0):
        super().__init__()
        c1, c2 = channels
        self.embed = TimeEmbedding(emb_dim, num_labels)
        self.inp = nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1)
        self.block1 = ResBlock(c1, c1, emb_dim)
        self.pool = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.block2 = ResBlock(c1, c2, emb_dim)
        self.block3 = ResBlock(c2, c2, emb_dim)
        self.head = nn.Sequential(nn.GroupNorm(8, c2), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c2, outputs))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.embed(t, y)
        h = self.block1(self.inp(x), emb)
        h = self.block3(self.block2(self.pool(h), emb), emb)
        return self.head(h)


class CleanClassifier(nn.Module):
    """An ordinary ReLU CNN trained on clean digits: ``classifier(x, t) -> logits [B, 10]`` (t ignored).

    >>> logits = CleanClassifier()(x0, None)
    """

    def __init__(self, channels: Sequence[int] = (32, 64)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c2, NUM_CLASSES)

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.features(x))


class Discriminator(nn.Module):
    """Time- and (optionally) class-conditioned real-vs-generated discriminator: ``d(x_t, t, y) -> logit [B]``.

    A positive logit means "real". ``y=None`` (or ``NULL_LABEL``) uses the class-free embedding.

    >>> logit = Discriminator()(x_t, t, y)
    """

    def __init__(self, channels: Sequence[int] = (32, 64), emb_dim: int = 64):
        super().__init__()
        self.net = NoisyClassifier(channels, emb_dim, outputs=1, num_labels=NUM_CLASSES + 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
        return self.net(x, t, y)[:, 0]
