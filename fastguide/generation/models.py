"""What a model is to the generation tools: ``ModelSpec``, and how ``--model`` names one.

A ``ModelSpec`` describes a trained diffusion model completely enough to sample it and store its samples as
images: the network and schedule, the sample shape, the sampler and step count it was made for, its classes,
its guidance methods, and how samples become uint8 images. It knows nothing about generation runs, shards
or processes, so other tools (``fastguide generate``, ``fastguide evaluate``, a future ``fastguide serve``)
share it.

``--model`` is ``digits`` (the shipped example) or ``package.module:factory``: a function taking no
arguments that returns a ``ModelSpec``:

>>> # mymodels.py
>>> def imagenet64():
...     unet = load_my_unet().eval().requires_grad_(False)
...     return ModelSpec(model=unet, schedule=fastguide.Schedule.ddpm(), sample_shape=(3, 64, 64),
...                      networks={"unet": unet}, num_classes=1000, null_label=1000, sampler="ddim", steps=50,
...                      clip=(-1.0, 1.0))
>>> # fastguide generate --model mymodels:imagenet64 --method cfg --cfg-scale 3 --seeds 0-49999 --out run

Guidance methods: ``methods`` maps each method name to its options and their defaults, and
``guidance(method, **options)`` returns the guidance specs for ``fastguide.sample``. When ``guidance`` is not
given the spec offers ``none`` and, with a ``null_label``, ``cfg`` (option ``cfg_scale``, default 3).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

import fastguide

DEFAULT_CFG_SCALE = 3.0


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Samples [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]: ``round((x + 1) * 127.5)`` clipped to 0..255
    (guided-diffusion's conversion and the layout its evaluator reads)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"samples must be a [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8_images(images: np.ndarray) -> torch.Tensor:
    """The inverse of ``to_uint8_images`` up to its rounding: uint8 [N, H, W, C] -> float32 [N, C, H, W] in
    [-1, 1] (``u / 127.5 - 1``, within 1/255 of the float sample where it was inside [-1, 1])."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 [N, H, W, C] array, got {images.dtype} {images.shape}")
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


@dataclass
class ModelSpec:
    """A diffusion model and everything needed to sample it and store the samples.

    * ``model(x, t, y)``: the network (``fastguide.sample``'s contract); ``schedule``: its ``fastguide.Schedule``.
    * ``sample_shape``: one sample's shape (C, H, W).
    * ``networks``: every ``nn.Module`` the model and its guidance use, by name (moved together by ``to``).
    * ``num_classes`` / ``null_label``: class count (``None``: unconditional only) and CFG's "no class" label.
    * ``sampler``, ``steps``, ``clip``: the defaults it was made for (``clip`` goes to ``clip_denoised``).
    * ``to_images`` / ``from_images``: float samples -> uint8 [N, H, W, C] and back (default: [-1, 1] data).
    * ``methods``: guidance method -> {option: default}; ``guidance(method, **options)``: its specs.
    * ``unconditional_model``: ``model`` with the class ignored (default: ``model`` with ``null_label``).
    * ``evaluate(x, labels) -> dict``: optional scores of float samples (``fastguide evaluate``).
    * ``network_kinds``: optional name -> ``"model"``, ``"classifier"`` or ``"discriminator"``: which of
      ``networks`` a served request may name for which guidance (``fastguide serve``; default any but the model).
    * ``encode_prompt(prompt) -> condition``: optional, for a model conditioned on text instead of classes:
      the condition tensor of one prompt (e.g. ``[L, D]`` encoder states, what ``model``'s ``y`` takes per
      sample); ``null_label`` is then the null condition (the uncond rows' ``y``) and ``num_classes`` None.
    """

    model: Callable[..., torch.Tensor]
    schedule: fastguide.Schedule
    sample_shape: Tuple[int, ...]
    networks: Dict[str, nn.Module] = field(default_factory=dict)
    num_classes: Optional[int] = None
    null_label: Optional[int] = None
    sampler: str = "ddim"
    steps: int = 50
    clip: Optional[Tuple[float, float]] = None
    to_images: Callable[[torch.Tensor], np.ndarray] = to_uint8_images
    from_images: Callable[[np.ndarray], torch.Tensor] = from_uint8_images
    methods: Optional[Dict[str, Dict[str, float]]] = None
    guidance: Optional[Callable[..., List]] = None
    unconditional_model: Optional[Callable[..., torch.Tensor]] = None
    evaluate: Optional[Callable[[torch.Tensor, np.ndarray], Dict[str, Any]]] = None
    name: str = ""
    network_kinds: Optional[Dict[str, str]] = None
    encode_prompt: Optional[Callable[[str], torch.Tensor]] = None

    def __post_init__(self):
        if not callable(self.model):
            raise TypeError("ModelSpec.model must be callable as model(x, t, y)")
        if not isinstance(self.schedule, fastguide.Schedule):
            raise TypeError(f"ModelSpec.schedule must be a fastguide.Schedule, got {type(self.schedule).__name__}")
        shape = tuple(self.sample_shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"ModelSpec.sample_shape must be positive ints, got {self.sample_shape!r}")
        self.sample_shape = shape
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"ModelSpec.num_classes must be a positive int or None, got {self.num_classes!r}")
        if self.methods is None:
            if self.guidance is not None:
                raise ValueError("ModelSpec.guidance needs ModelSpec.methods (method -> {option: default})")
            self.methods = {"none": {}}
            if self.null_label is not None:
                self.methods["cfg"] = {"cfg_scale": DEFAULT_CFG_SCALE}
        if self.guidance is None:
            self.guidance = self._default_guidance

    def _default_guidance(self, method: str, **options) -> List:
        if method == "none":
            return []
        if method == "cfg":
            return [fastguide.CFG(options.get("cfg_scale", DEFAULT_CFG_SCALE), null_label=self.null_label)]
        raise ValueError(f"unknown guidance method {method!r}; choose from {sorted(self.methods)}")

    def conditional(self, unconditional: bool) -> Callable[..., torch.Tensor]:
        """The network to sample: ``model``, or the unconditional one (class ignored)."""
        if not unconditional:
            return self.model
        if self.unconditional_model is not None:
            return self.unconditional_model
        if self.null_label is None:
            raise ValueError("this model has no null label (and no unconditional_model): it cannot run "
                             "unconditionally")
        model, null = self.model, self.null_label

        def unconditional_model(x, t, y=None):
            return model(x, t, torch.full((x.shape[0],), null, dtype=torch.long, device=x.device))
        return unconditional_model

    def to(self, device) -> "ModelSpec":
        """Move every network to ``device`` (in place) and return self."""
        for net in self.networks.values():
            net.to(device)
        return self


BUILTIN = {"digits": "fastguide.generation.models:digits"}


def load_model(name: str) -> ModelSpec:
    """The ``ModelSpec`` of ``--model NAME``: a built-in name (``digits``) or ``package.module:factory``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--model must be 'digits' or 'package.module:factory', got {name!r}")
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"--model {name!r}: not a built-in model ({', '.join(BUILTIN)}) and not of the form "
                         f"'package.module:factory'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {name!r}: {module_name} has no callable {attr!r}")
    try:
        spec = factory()
    except TypeError as e:
        raise ValueError(f"--model {name!r}: {attr}() must take no arguments and return a ModelSpec ({e})") from None
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"--model {name!r}: {attr}() must return a fastguide.generation.ModelSpec, got "
                         f"{type(spec).__name__}")
    if not spec.name:
        spec.name = name
    return spec


# ---------------------------------------------------------------------------------------------------------
# The shipped digits model.

def _digits_guidance(bundle):
    from dataclasses import replace

    from fastguide.examples import digits as d

    def guidance(method: str, **options) -> List:
        specs = d.guidance(method, bundle)  # the recommended specs; the options override their scales
        if "cfg_scale" in options:
            specs = [replace(s, scale=float(options["cfg_scale"])) for s in specs]
        if "classifier_scale" in options:
            specs = [replace(s, scale=float(options["classifier_scale"])) for s in specs]
        if "dg_weight" in options:
            specs = [replace(s, weight=float(options["dg_weight"])) for s in specs]
        return specs
    return guidance


def digits_scores(x: torch.Tensor, labels: np.ndarray) -> Dict[str, Any]:
    """The digits demo's scores of samples ``x`` ([N, 1, 8, 8] in [-1, 1]) asked to be ``labels``: the judge's
    class accuracy, the Fréchet distance to the held-out digits, the FD of as many real training digits
    (the floor), and per-class counts and accuracies (``fastguide.examples.digits.evaluate``)."""
    from fastguide.examples.digits import evaluate as ev
    from fastguide.examples.digits.data import NUM_CLASSES, to_sklearn

    labels = np.asarray(labels, dtype=np.int64)
    if len(x) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples, got {len(x)}")
    features = to_sklearn(x)
    pred = ev.evaluator().predict(features)
    per_class = {}
    for c in range(NUM_CLASSES):
        asked = labels == c
        per_class[c] = {"count": int(asked.sum()), "predicted": int((pred == c).sum()),
                        "accuracy": float((pred[asked] == c).mean()) if asked.any() else None}
    return {"n": int(len(x)), "accuracy": float((pred == labels).mean()),
            "fd": ev.frechet_distance(features, ev.held_out_arrays()[0]),
            "floor_fd": ev.real_floor_fd(len(x)),
            "judge_accuracy_on_held_out": ev.evaluator_accuracy_on_held_out(),
            "per_class": per_class}


def digits() -> ModelSpec:
    """The shipped digits networks (``fastguide.examples.digits``) with the demo's six guidance methods and
    recommended scales; ``--cfg-scale``, ``--classifier-scale`` (adm, offshelf_xt, offshelf) and
    ``--dg-weight`` override them."""
    from fastguide.examples import digits as d

    bundle = d.load()
    smoothed = bundle.smoothed_clean_classifier(d.SOFTPLUS_BETA)  # cached: the guidance reuses this module
    methods = {"none": {}, "cfg": {"cfg_scale": d.CFG_SCALE}, "adm": {"classifier_scale": d.ADM_SCALE},
               "offshelf_xt": {"classifier_scale": d.OFFSHELF_XT_SCALE},
               "offshelf": {"classifier_scale": d.OFFSHELF_SCALE}, "dg": {"dg_weight": d.DG_WEIGHT}}
    assert tuple(methods) == tuple(d.METHODS)
    return ModelSpec(model=bundle.model, schedule=bundle.schedule, sample_shape=tuple(bundle.image_shape),
                     networks={"model": bundle.model, "noisy_classifier": bundle.noisy_classifier,
                               "clean_classifier": bundle.clean_classifier, "smoothed_clean_classifier": smoothed,
                               "discriminator": bundle.discriminator},
                     num_classes=d.NUM_CLASSES, null_label=d.NULL_LABEL, sampler=bundle.sampler, steps=bundle.steps,
                     clip=tuple(bundle.clip), methods=methods, guidance=_digits_guidance(bundle),
                     unconditional_model=bundle.unconditional_model(), evaluate=digits_scores, name="digits",
                     network_kinds={"model": "model", "noisy_classifier": "classifier",
                                    "clean_classifier": "classifier", "smoothed_clean_classifier": "classifier",
                                    "discriminator": "discriminator"})


def option_flag(key: str) -> str:
    """The command-line flag of a guidance option: ``cfg_scale`` -> ``--cfg-scale``."""
    return "--" + key.replace("_", "-")


def resolve_options(spec: ModelSpec, method: str, options: Mapping[str, Any]) -> Dict[str, float]:
    """The method's options with the user's values over its defaults; an option the method does not take
    is an error naming it and the ones it does take."""
    if method not in spec.methods:
        raise ValueError(f"--method {method!r} is not a method of model {spec.name or '?'}; choose from "
                         f"{', '.join(spec.methods)}")
    defaults = spec.methods[method]
    resolved = dict(defaults)
    for key, value in options.items():
        if value is None:
            continue
        if key not in defaults:
            takes = ", ".join(option_flag(k) for k in defaults) or "no options"
            raise ValueError(f"{option_flag(key)} does not apply to --method {method} (it takes {takes})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{option_flag(key)} must be a finite number >= 0, got {value!r}")
        resolved[key] = float(value)
    return resolved
