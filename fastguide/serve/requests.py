"""What a client asks the serving engine for: ``SampleRequest``, parsed and checked from a JSON object.

Every field is checked here, before anything is queued; a bad one raises ``RequestError`` naming it
(``"steps"``, ``"guidance[1].scale"``), which the HTTP server answers with a 4xx. The request body:

``{"label": int | null, "seed": int, "steps": int, "sampler": str, "guidance": [...], "target": int,
"prompt": str, "format": "raw" | "png"}`` with guidance entries

* ``{"type": "cfg", "scale": w, "rescale": phi, "start": a, "stop": b}`` (``fastguide.CFG``),
* ``{"type": "classifier", "network": name, "scale": s, "input": "xt" | "x0", "tau1", "tau2", "gamma",
  "g_max", "add"}`` (``fastguide.ClassifierGuidance``),
* ``{"type": "discriminator", "network": name, "weight": w, "weight2", "t_min", "t_max"}``
  (``fastguide.DiscriminatorGuidance``).

>>> req = parse_request({"label": 3, "seed": 7, "steps": 20,
...                      "guidance": [{"type": "cfg", "scale": 2.0}]}, served)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..guidance.specs import CFG, ClassifierGuidance, DiscriminatorGuidance
from ..samplers.native import FLOW_SAMPLERS, SAMPLERS, SIGMA_SAMPLERS

FORMATS = ("raw", "png")
MAX_SEED = 2 ** 63 - 1


class RequestError(ValueError):
    """A request field that is missing, of the wrong type or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the model's classes, samplers, step limit and guidance networks.

    ``networks`` maps a name to ``(kind, module)`` with kind ``"classifier"`` or ``"discriminator"``
    (what the request's guidance entry may name); ``prompt`` says the model is conditioned on a text
    prompt (its ``encode_prompt``) instead of a class label."""

    num_classes: Optional[int]
    null_label: Any
    samplers: Tuple[str, ...]
    default_sampler: str
    default_steps: int
    max_steps: int
    networks: Mapping[str, Any]
    prompt: bool = False


@dataclass
class SampleRequest:
    """One checked request; ``guidance`` holds the ``fastguide`` specs it asked for, in its order."""

    seed: int
    steps: int
    sampler: str
    label: Optional[int] = None
    target: Optional[int] = None
    prompt: Optional[str] = None
    guidance: List[Any] = field(default_factory=list)
    format: str = "raw"
    cfg_scale: float = 1.0
    cfg_rescale: float = 0.0

    @property
    def class_label(self) -> Optional[int]:
        """The class the guidance networks are asked about: the label, or the target without one."""
        return self.label if self.label is not None else self.target


def _int(body: Mapping, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
         required: bool = False, default=None):
    if name not in body or body[name] is None:
        if required:
            raise RequestError(name, "is required")
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise RequestError(name, f"must be in {bounds}, got {value}")
    return value


def _number(entry: Mapping, where: str, name: str, default: float, *, lo: float = 0.0,
            hi: Optional[float] = None) -> float:
    value = entry.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.{name}", f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
        bounds = f"in [{lo}, {hi}]" if hi is not None else f"finite and >= {lo}"
        raise RequestError(f"{where}.{name}", f"must be {bounds}, got {value}")
    return value


def _choice(entry: Mapping, where: str, name: str, choices: Sequence[str], default: Optional[str]) -> str:
    value = entry.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise RequestError(where + name if not where else f"{where}.{name}",
                           f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _known_keys(entry: Mapping, where: str, allowed: Sequence[str]) -> None:
    for key in entry:
        if key not in allowed:
            raise RequestError(f"{where}.{key}" if where else key,
                               f"is not a field of this request (fields: {', '.join(allowed)})")


CFG_FIELDS = ("type", "scale", "rescale", "start", "stop")
CLASSIFIER_FIELDS = ("type", "network", "scale", "input", "tau1", "tau2", "gamma", "g_max", "add")
DISCRIMINATOR_FIELDS = ("type", "network", "weight", "weight2", "t_min", "t_max")
REQUEST_FIELDS = ("label", "seed", "steps", "sampler", "guidance", "target", "prompt", "format")


def _network(entry: Mapping, where: str, kind: str, served: ServedModel):
    name = entry.get("network")
    if not isinstance(name, str):
        raise RequestError(f"{where}.network", f"must name a {kind} network, got {name!r}")
    known = sorted(n for n, (k, _) in served.networks.items() if k in (kind, "any"))
    if name not in known:
        raise RequestError(f"{where}.network", f"unknown {kind} network {name!r}; this model has "
                                               f"{', '.join(known) or 'none'}")
    return served.networks[name][1]


def _real(entry: Mapping, where: str, name: str, default: float) -> float:
    return _number(entry, where, name, default, lo=-math.inf)


def _guidance_entry(entry, where: str, served: ServedModel):
    """One guidance entry as a ``fastguide`` spec."""
    if not isinstance(entry, Mapping):
        raise RequestError(where, f"must be an object with a 'type', got {type(entry).__name__}")
    kind = _choice(entry, where, "type", ("cfg", "classifier", "discriminator"), None)
    if kind == "cfg":
        _known_keys(entry, where, CFG_FIELDS)
        if served.null_label is None:
            raise RequestError(f"{where}.type", "this model has no null condition: it cannot run CFG")
        scale = _number(entry, where, "scale", 1.0)
        rescale = _number(entry, where, "rescale", 0.0, hi=1.0)
        start = _number(entry, where, "start", 0.0, hi=1.0)
        stop = _number(entry, where, "stop", 1.0, hi=1.0)
        if stop < start:
            raise RequestError(f"{where}.stop", f"must be >= start ({start}), got {stop}")
        return CFG(scale, rescale=rescale, null_label=served.null_label, start=start, stop=stop)
    if kind == "classifier":
        _known_keys(entry, where, CLASSIFIER_FIELDS)
        net = _network(entry, where, "classifier", served)
        return ClassifierGuidance(net, _number(entry, where, "scale", 1.0),
                                  input=_choice(entry, where, "input", ("xt", "x0"), "xt"),
                                  tau1=_real(entry, where, "tau1", 1.0), tau2=_real(entry, where, "tau2", 1.0),
                                  gamma=_number(entry, where, "gamma", 0.0), g_max=_number(entry, where, "g_max", 0.004),
                                  add=_number(entry, where, "add", 0.3))
    _known_keys(entry, where, DISCRIMINATOR_FIELDS)
    net = _network(entry, where, "discriminator", served)
    t_min = _number(entry, where, "t_min", 0.0, hi=1.0)
    t_max = _number(entry, where, "t_max", 1.0, hi=1.0)
    if t_max < t_min:
        raise RequestError(f"{where}.t_max", f"must be >= t_min ({t_min}), got {t_max}")
    return DiscriminatorGuidance(net, weight=_number(entry, where, "weight", 1.0),
                                 weight2=_number(entry, where, "weight2", 0.0), t_min=t_min, t_max=t_max)


def _guidance(body: Mapping, served: ServedModel) -> List[Any]:
    entries = body.get("guidance", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise RequestError("guidance", f"must be a list of guidance objects, got {type(entries).__name__}")
    specs = [_guidance_entry(e, f"guidance[{i}]", served) for i, e in enumerate(entries)]
    if sum(isinstance(s, CFG) for s in specs) > 1:
        raise RequestError("guidance", "at most one cfg entry")
    return specs


def _condition(body: Mapping, served: ServedModel, specs: List[Any]) -> Dict[str, Any]:
    """label / target / prompt, against what the model is conditioned on."""
    if served.prompt:
        for name in ("label", "target"):
            if body.get(name) is not None:
                raise RequestError(name, "this model is conditioned on a text prompt: send 'prompt'")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("prompt", f"must be a string, got {type(prompt).__name__}")
        if any(isinstance(s, ClassifierGuidance) for s in specs):
            raise RequestError("guidance", "classifier guidance needs class labels; this model takes prompts")
        return {"prompt": prompt}
    if body.get("prompt") is not None:
        raise RequestError("prompt", "this model is conditioned on class labels: send 'label'")
    top = served.num_classes - 1 if served.num_classes else None
    label = _int(body, "label", minimum=0, maximum=top)
    target = _int(body, "target", minimum=0, maximum=top)
    if label is None and served.num_classes is not None and served.null_label is None:
        raise RequestError("label", "this model has no unconditional mode (no null label): a label is required")
    if label is not None and served.num_classes is None:
        raise RequestError("label", "this model is unconditional: send null")
    if label is not None and target is not None and target != label:
        raise RequestError("target", f"guides towards the label ({label}) when one is given; got {target}")
    guided = [s for s in specs if isinstance(s, (ClassifierGuidance, DiscriminatorGuidance))]
    if label is None and guided and target is None and served.num_classes is not None:
        raise RequestError("target", "classifier / discriminator guidance of the unconditional model needs "
                                     "the target class")
    if label is None and any(isinstance(s, CFG) for s in specs):
        raise RequestError("guidance", "cfg needs a label: the unconditional model has no condition to guide by")
    return {"label": label, "target": target}


def parse_request(body, served: ServedModel) -> SampleRequest:
    """A checked ``SampleRequest`` from a JSON object (or an already built ``SampleRequest``)."""
    if isinstance(body, SampleRequest):
        return body
    if not isinstance(body, Mapping):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    _known_keys(body, "", REQUEST_FIELDS)
    seed = _int(body, "seed", minimum=0, maximum=MAX_SEED, required=True)
    steps = _int(body, "steps", minimum=1, maximum=served.max_steps, default=served.default_steps)
    sampler = _choice(body, "", "sampler", served.samplers, served.default_sampler)
    fmt = _choice(body, "", "format", FORMATS, "raw")
    specs = _guidance(body, served)
    condition = _condition(body, served, specs)
    cfg = next((s for s in specs if isinstance(s, CFG)), None)
    return SampleRequest(seed=seed, steps=steps, sampler=sampler, guidance=specs, format=fmt,
                         cfg_scale=float(cfg.scale) if cfg is not None else 1.0,
                         cfg_rescale=float(cfg.rescale) if cfg is not None else 0.0, **condition)


def samplers_for(schedule) -> Tuple[str, ...]:
    """The native samplers that run on ``schedule`` (``fastguide.samplers.native.build`` refuses the others)."""
    if schedule.kind == "vp":
        return SAMPLERS
    if schedule.kind == "flow":
        return FLOW_SAMPLERS
    return SIGMA_SAMPLERS
