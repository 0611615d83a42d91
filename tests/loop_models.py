"""Small networks for whole-loop tests: a class-conditional eps net, a time-conditioned classifier, a
discriminator and an EDM denoiser. Deterministic weights; ``EpsNet.calls`` counts forward calls (a replayed
graph must not run the network's Python)."""

import torch
from torch import nn


class EpsNet(nn.Module):
    """A class-conditional eps network (an ``nn.Module``, as real models are); ``learned=True`` also returns
    the learned-range variance channels (guided-diffusion's ``learn_sigma``)."""

    def __init__(self, channels: int = 3, classes: int = 11, learned: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels * (2 if learned else 1), 3, padding=1)
        self.emb = nn.Embedding(classes, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        self.channels, self.learned, self.calls = channels, learned, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        h = torch.tanh(self.conv(x) + (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1))
        if y is not None:
            h = h + 0.1 * self.emb(y).reshape(-1, self.channels, 1, 1).repeat(1, 2 if self.learned else 1, 1, 1)
        return 0.5 * h


class Classifier(nn.Module):
    """Logits over ``classes`` from a conv, a smooth pooling and a linear head, scaled by the timestep."""

    def __init__(self, channels: int = 3, classes: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        h = torch.nn.functional.softplus(self.conv(x), beta=3.0).mean(dim=(2, 3))
        return self.head(h) * (1 + t.reshape(-1, 1) / 1000)


def disc(x, t, y=None):
    """A discriminator logit, smooth in x."""
    return 0.05 * (x.flatten(1) ** 2).sum(1) - t / 1000


def eps_model(x, t, y=None):
    """A smooth eps model of any [B, ...] state; labels (when given) shift it per sample."""
    tt = (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)
    out = 0.6 * torch.tanh(0.8 * x + 0.3 * tt)
    if y is not None:
        out = out + 0.05 * y.to(x.dtype).reshape(-1, 1, 1, 1)
    return out


def edm_denoiser(x, sigma, y=None):
    """An EDM denoiser D(x; sigma) (exact for data concentrated at 0, plus a smooth term)."""
    s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    return x / (1 + s * s) + 0.1 * torch.tanh(x)
