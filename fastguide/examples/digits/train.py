"""Train the four digits networks on the CPU (``fastguide train-digits``) and save them as safetensors.

Every loop is seeded through one ``torch.Generator`` (batches, timesteps, noise, label dropout) plus
``torch.manual_seed`` for the initial weights, and uses the training split only. Order matters: the
discriminator is trained on samples of the finished denoiser, as in Kim et al. 2022.

>>> from fastguide.examples.digits import train
>>> train.train_all("weights/", seed=0)          # minutes on a 2-core CPU
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastguide

from ... import training
from . import config
from .data import IMAGE_SHAPE, NUM_CLASSES, load_train
from .models import NULL_LABEL, CleanClassifier, Discriminator, NoisyClassifier, UNet

Log = Optional[Callable[[str], None]]

WEIGHT_FILES = {"model": "unet.safetensors", "noisy_classifier": "noisy_classifier.safetensors",
                "clean_classifier": "clean_classifier.safetensors", "discriminator": "discriminator.safetensors"}


@dataclass(frozen=True)
class TrainConfig:
    """Iterations and optimiser settings of ``train_all`` (defaults: what the shipped weights used)."""

    seed: int = 0
    denoiser_steps: int = 4000
    denoiser_lr: float = 2e-3
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    noisy_classifier_steps: int = 3000
    clean_classifier_steps: int = 1500
    discriminator_steps: int = 2000
    generated_per_class: int = 150
    batch_size: int = 128


def _lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _fit(net: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
         generator: torch.Generator, name: str, log: Log, ema: Optional[nn.Module] = None,
         ema_decay: float = 0.999, weight_decay: float = 0.0) -> float:
    """Adam(W) on ``loss_fn(generator)`` for ``steps`` iterations; returns the mean loss of the last 10%."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    start, tail = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = loss_fn(generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            training.ema_update(ema, net, ema_decay)
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  {name}: step {step + 1}/{steps}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)")
    net.eval()
    return sum(tail) / len(tail)


def _batch(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator):
    idx = torch.randint(0, x.shape[0], (size,), generator=generator)
    return x[idx], y[idx]


def train_denoiser(x: torch.Tensor, y: torch.Tensor, schedule: fastguide.Schedule, *, steps: int,
                   lr: float = 2e-3, p_uncond: float = 0.1, ema_decay: float = 0.999, batch_size: int = 128,
                   seed: int = 0, log: Log = None) -> UNet:
    """The class-conditional eps UNet with CFG label dropout (null label ``NULL_LABEL``); returns the EMA.

    >>> unet = train_denoiser(*load_train(), config.make_schedule(), steps=6000)
    """
    torch.manual_seed(seed)
    net, gen = UNet(), torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(net).requires_grad_(False)

    def loss_fn(g):
        xb, yb = _batch(x, y, batch_size, g)
        return training.diffusion_loss(net, xb, yb, schedule, p_uncond=p_uncond, null_label=NULL_LABEL, generator=g)

    _fit(net, loss_fn, steps, lr, gen, "denoiser", log, ema=ema, ema_decay=ema_decay)
    return ema.eval()


def train_noisy_classifier(x: torch.Tensor, y: torch.Tensor, schedule: fastguide.Schedule, *, steps: int,
                           lr: float = 2e-3, batch_size: int = 128, seed: int = 0, log: Log = None) -> NoisyClassifier:
    """ADM's timestep-conditioned classifier on x_t, t uniform over all 1000 training steps.

    >>> clf = train_noisy_classifier(*load_train(), config.make_schedule(), steps=3000)
    """
    torch.manual_seed(seed + 1)
    net, gen = NoisyClassifier(), torch.Generator().manual_seed(seed + 1)

    def loss_fn(g):
        xb, yb = _batch(x, y, batch_size, g)
        return training.noisy_classifier_loss(net, xb, yb, schedule, generator=g)

    _fit(net, loss_fn, steps, lr, gen, "noisy classifier", log, weight_decay=1e-4)
    return net


def train_clean_classifier(x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 2e-3,
                           batch_size: int = 128, seed: int = 0, log: Log = None) -> CleanClassifier:
    """An ordinary ReLU CNN with cross-entropy on clean digits only: never sees noise, so it is the
    off-the-shelf classifier of Ma et al. in miniature.

    >>> clf = train_clean_classifier(*load_train(), steps=1500)
    """
    torch.manual_seed(seed + 2)
    net, gen = CleanClassifier(), torch.Generator().manual_seed(seed + 2)

    def loss_fn(g):
        xb, yb = _batch(x, y, batch_size, g)
        return F.cross_entropy(net(xb), yb)

    _fit(net, loss_fn, steps, lr, gen, "clean classifier", log, weight_decay=1e-4)
    return net


@torch.no_grad()
def generate(model: Callable[..., torch.Tensor], y: torch.Tensor, schedule: fastguide.Schedule, *,
             seed: int = 0, batch: int = 500) -> torch.Tensor:
    """Unguided conditional samples of ``model`` for labels ``y`` with the digits sampler (the generated half
    of the discriminator's training set).

    >>> fake = generate(unet, torch.arange(10).repeat(100), config.make_schedule())
    """
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for lo in range(0, len(y), batch):
        yb = y[lo:lo + batch]
        x_T = torch.randn((len(yb),) + IMAGE_SHAPE, generator=gen)
        parts.append(fastguide.sample(model, x_T, schedule=schedule, sampler=config.SAMPLER, steps=config.STEPS,
                                      y=yb, generator=gen, clip_denoised=config.CLIP))
    return torch.cat(parts)


def train_discriminator(real: torch.Tensor, y_real: torch.Tensor, fake: torch.Tensor, y_fake: torch.Tensor,
                        schedule: fastguide.Schedule, *, steps: int, lr: float = 1e-3, batch_size: int = 128,
                        seed: int = 0, log: Log = None) -> Discriminator:
    """The class-conditional real-vs-generated discriminator on x_t at uniform t (BCE, real = 1).

    >>> disc = train_discriminator(x, y, fake, y_fake, config.make_schedule(), steps=2000)
    """
    torch.manual_seed(seed + 3)
    net, gen = Discriminator(), torch.Generator().manual_seed(seed + 3)

    def loss_fn(g):
        rb, ryb = _batch(real, y_real, batch_size // 2, g)
        fb, fyb = _batch(fake, y_fake, batch_size // 2, g)
        return training.discriminator_loss(net, rb, fb, schedule, y_real=ryb, y_fake=fyb, generator=g)

    _fit(net, loss_fn, steps, lr, gen, "discriminator", log, weight_decay=1e-4)
    return net


def save(nets: Dict[str, nn.Module], out_dir: str, metadata: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Write each network's ``state_dict`` to ``out_dir/<WEIGHT_FILES[name]>``; returns the paths."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, net in nets.items():
        path = os.path.join(out_dir, WEIGHT_FILES[name])
        state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(state, path, metadata=metadata or {})
        paths[name] = path
    return paths


def train_all(out_dir: str, cfg: TrainConfig = TrainConfig(), log: Log = print) -> Dict[str, str]:
    """Train every digits network with ``cfg`` and save them to ``out_dir``; returns the file paths.

    >>> train_all("fastguide/examples/digits/weights")      # what `fastguide train-digits` runs
    """
    x, y = load_train()
    schedule = config.make_schedule()
    say = log or (lambda _: None)
    start = time.perf_counter()
    say(f"training on {len(x)} digits (held-out split excluded), seed {cfg.seed}, {torch.get_num_threads()} threads")
    unet = train_denoiser(x, y, schedule, steps=cfg.denoiser_steps, lr=cfg.denoiser_lr, p_uncond=cfg.p_uncond,
                          ema_decay=cfg.ema_decay, batch_size=cfg.batch_size, seed=cfg.seed, log=log)
    noisy = train_noisy_classifier(x, y, schedule, steps=cfg.noisy_classifier_steps, batch_size=cfg.batch_size,
                                   seed=cfg.seed, log=log)
    clean = train_clean_classifier(x, y, steps=cfg.clean_classifier_steps, batch_size=cfg.batch_size,
                                   seed=cfg.seed, log=log)
    y_fake = torch.arange(NUM_CLASSES).repeat_interleave(cfg.generated_per_class)
    say(f"  generating {len(y_fake)} samples for the discriminator")
    fake = generate(unet, y_fake, schedule, seed=cfg.seed + 4)
    disc = train_discriminator(x, y, fake, y_fake, schedule, steps=cfg.discriminator_steps,
                               batch_size=cfg.batch_size, seed=cfg.seed, log=log)
    meta = {k: str(v) for k, v in asdict(cfg).items()}
    paths = save({"model": unet, "noisy_classifier": noisy, "clean_classifier": clean, "discriminator": disc},
                 out_dir, meta)
    say(f"saved {', '.join(paths.values())} in {time.perf_counter() - start:.0f} s")
    return paths
