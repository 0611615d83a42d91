"""Real data end to end: scikit-learn's 8x8 digits with trained networks for every guidance method.

The package ships four small networks (safetensors, ``weights/``) trained on the training split of
``sklearn.datasets.load_digits`` by ``fastguide train-digits`` (seeded, CPU minutes):

* ``model(x, t, y)`` — class-conditional eps UNet trained with CFG label dropout (``NULL_LABEL`` = 10);
* ``noisy_classifier(x, t)`` — ADM-style timestep-conditioned classifier trained on x_t;
* ``clean_classifier(x, t)`` — ReLU CNN trained on clean digits only (ignores t): the off-the-shelf one;
* ``discriminator(x, t, y)`` — real-vs-generated logit on x_t (Kim et al.'s discriminator guidance).

>>> from fastguide.examples import digits
>>> bundle = digits.load()
>>> y = torch.arange(10).repeat(8)
>>> x = digits.sample(bundle, y, "offshelf", seed=0)          # or by hand:
>>> x = fastguide.sample(bundle.model, torch.randn(80, *bundle.image_shape), schedule=bundle.schedule,
...                      sampler=bundle.sampler, steps=bundle.steps, y=y, clip_denoised=(-1, 1),
...                      guidance=digits.guidance("offshelf", bundle))
>>> digits.to_sklearn(x).shape        # (80, 64) on scikit-learn's 0..16 pixel scale
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import fastguide

from . import config
from .data import IMAGE_SHAPE, NUM_CLASSES, from_sklearn, load_real, load_train, to_sklearn
from .models import NULL_LABEL, CleanClassifier, Discriminator, NoisyClassifier, UNet

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

# The guidance methods of `guidance()`, in the demo's order.
METHODS = ("none", "cfg", "adm", "offshelf_xt", "offshelf", "dg")

# Recommended settings, chosen on a validation seed (seed 1, 30 samples per class, unconditional model for the
# classifier methods) as the most accurate setting whose FD stays within 1.25x the unguided FD; DG by lowest FD.
# The README's digits section lists the sweep. Ma et al.'s ImageNet defaults (Softplus beta 3, tau2 0.5,
# gamma 0.3 at scale 1) destroy digits samples: see the README for why.
CFG_SCALE = 2.0
ADM_SCALE = 5.0
OFFSHELF_XT_SCALE = 1.0
OFFSHELF_SCALE = 0.5
SOFTPLUS_BETA = 10.0
TAU1, TAU2 = 1.0, 0.9
GAMMA = 0.3
DG_WEIGHT = 2.0
DG_T_MIN = 0.0


@dataclass
class Bundle:
    """The trained digits networks and the sampling setup they were trained for.

    Networks are ``nn.Module``s in eval mode with frozen parameters (guidance differentiates w.r.t. inputs
    only). ``model`` is conditional; call it with ``y = NULL_LABEL`` (or ``None``) for the unconditional model.
    """

    model: UNet
    noisy_classifier: NoisyClassifier
    clean_classifier: CleanClassifier
    discriminator: Discriminator
    schedule: fastguide.Schedule
    sampler: str = config.SAMPLER
    steps: int = config.STEPS
    image_shape: tuple = IMAGE_SHAPE
    clip: tuple = config.CLIP
    _smoothed: Dict[float, nn.Module] = field(default_factory=dict, repr=False)

    def smoothed_clean_classifier(self, beta: float = SOFTPLUS_BETA) -> nn.Module:
        """The clean classifier with every ReLU swapped for Softplus(beta) (``fastguide.smooth``), cached."""
        if beta not in self._smoothed:
            self._smoothed[beta] = fastguide.smooth(self.clean_classifier, beta).eval()
        return self._smoothed[beta]

    def unconditional_model(self) -> Callable[..., torch.Tensor]:
        """``model(x, t, y)`` that ignores ``y`` and always asks for the null label: the unconditional model,
        for classifier guidance of an unconditional base (ADM's unconditional setting)."""
        unet = self.model
        return lambda x, t, y=None: unet(x, t, None)


def _frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


def load(weights_dir: Optional[str] = None) -> Bundle:
    """Load the shipped (or ``weights_dir``'s) digits networks into a ``Bundle``.

    >>> bundle = digits.load()
    >>> eps = bundle.model(torch.randn(4, 1, 8, 8), torch.full((4,), 500.0), torch.tensor([0, 1, 2, 10]))
    """
    from safetensors.torch import load_file

    from .train import WEIGHT_FILES

    root = weights_dir or WEIGHTS_DIR
    nets = {"model": UNet(), "noisy_classifier": NoisyClassifier(), "clean_classifier": CleanClassifier(),
            "discriminator": Discriminator()}
    for name, net in nets.items():
        path = os.path.join(root, WEIGHT_FILES[name])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run `fastguide train-digits` to create the digits weights")
        net.load_state_dict(load_file(path))
        _frozen(net)
    return Bundle(schedule=config.make_schedule(), **nets)


def guidance(name: str, bundle: Bundle) -> List:
    """The recommended guidance specs of method ``name`` for ``bundle`` (pass them to ``fastguide.sample``).

    * ``"none"`` — no guidance (the plain conditional model).
    * ``"cfg"`` — classifier-free guidance, scale ``CFG_SCALE``, null label ``NULL_LABEL``.
    * ``"adm"`` — ADM: the noisy classifier on x_t, log-softmax, scale ``ADM_SCALE``.
    * ``"offshelf_xt"`` — naive off-the-shelf guidance: the clean classifier on x_t, plain log-softmax, no
      smoothing, constant scale ``OFFSHELF_XT_SCALE``.
    * ``"offshelf"`` — Ma et al. 2023: the clean classifier on x0^, Softplus(``SOFTPLUS_BETA``), joint
      temperatures (``TAU1``, ``TAU2``), sine schedule ``GAMMA``, scale ``OFFSHELF_SCALE``.
    * ``"dg"`` — discriminator guidance with weight ``DG_WEIGHT``.

    >>> fastguide.sample(..., guidance=digits.guidance("adm", bundle))
    """
    if name == "none":
        return []
    if name == "cfg":
        return [fastguide.CFG(CFG_SCALE, null_label=NULL_LABEL)]
    if name == "adm":
        return [fastguide.ClassifierGuidance(bundle.noisy_classifier, ADM_SCALE, input="xt")]
    if name == "offshelf_xt":
        return [fastguide.ClassifierGuidance(bundle.clean_classifier, OFFSHELF_XT_SCALE, input="xt")]
    if name == "offshelf":
        return [fastguide.ClassifierGuidance(bundle.smoothed_clean_classifier(SOFTPLUS_BETA), OFFSHELF_SCALE,
                                             input="x0", tau1=TAU1, tau2=TAU2, gamma=GAMMA)]
    if name == "dg":
        return [fastguide.DiscriminatorGuidance(bundle.discriminator, weight=DG_WEIGHT, t_min=DG_T_MIN)]
    raise ValueError(f"unknown digits guidance method {name!r}; choose from {METHODS}")


def sample(bundle: Bundle, y: torch.Tensor, method: str = "none", *, seed: int = 0,
           unconditional: bool = False, guidance_specs: Optional[Sequence] = None,
           steps: Optional[int] = None) -> torch.Tensor:
    """Samples [N, 1, 8, 8] in [-1, 1] for labels ``y`` with the recommended specs of ``method`` (or
    ``guidance_specs``), seeded. ``unconditional=True`` runs the unconditional model (null label), so the
    class comes from the guidance alone.

    >>> x = digits.sample(bundle, torch.arange(10).repeat(5), "cfg", seed=0)
    """
    specs = guidance(method, bundle) if guidance_specs is None else list(guidance_specs)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(y),) + tuple(bundle.image_shape), generator=gen)
    model = bundle.unconditional_model() if unconditional else bundle.model
    return fastguide.sample(model, x_T, schedule=bundle.schedule, sampler=bundle.sampler,
                            steps=steps or bundle.steps, y=y, guidance=specs, generator=gen, clip_denoised=bundle.clip)


__all__ = ["Bundle", "IMAGE_SHAPE", "METHODS", "NULL_LABEL", "NUM_CLASSES", "from_sklearn", "guidance", "load",
           "load_real", "load_train", "sample", "to_sklearn"]
