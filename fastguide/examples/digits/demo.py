"""``fastguide demo``: every guidance method on the shipped digits networks, judged by tools no method uses.

For each method it samples ``per_class`` digits of every class with the same seed, then reports

* class accuracy: the share the scikit-learn judge (``evaluate.evaluator``) assigns the requested class;
* FD: Fréchet distance to the held-out real digits in 0..16 pixel space (``evaluate.frechet_distance``);
* ECE: integral ECE (``fastguide.calibration``) of the classifier the method uses, on the inputs it sees
  (x_t or x0^ of noised held-out digits at the sampler's timesteps);
* seconds per sample of ``fastguide.sample`` (wall clock, this machine).

Two settings share one table: the conditional model (``y`` to the UNet; guidance adds to it, as in ADM's
and Ma et al.'s ImageNet runs) and the unconditional model (null label; the class comes from the
classifier alone). Then an ablation of Ma et al.'s choices on the off-the-shelf classifier.

>>> from fastguide.examples.digits.demo import run_demo
>>> result = run_demo(out_dir="demo_out", quick=True)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fastguide
from fastguide.calibration import integral_ece

from .. import digits
from . import evaluate
from .data import NUM_CLASSES, load_real

Log = Callable[[str], None]


@dataclass
class Row:
    """One sampled configuration and its scores."""

    name: str
    setting: str                    # "conditional" or "unconditional"
    accuracy: float
    fd: float
    ece: Optional[float]            # None when the method has no classifier
    seconds_per_sample: float
    samples: torch.Tensor = field(repr=False)


@dataclass
class DemoResult:
    rows: List[Row]
    ablation: List[Row]
    per_class: int
    steps: int
    floor_fd: float
    judge_accuracy: float
    table: str = ""


@dataclass(frozen=True)
class Config:
    """A row to sample: guidance specs, base model, and how to measure the classifier's integral ECE."""

    name: str
    setting: str
    specs: Sequence
    ece_classifier: Optional[Callable] = None
    ece_input: str = "xt"
    same_as: Optional[tuple] = None  # (name, setting) of a main-table row with identical specs: reuse it


def _classifier_spec(classifier, input: str, tau1: float = 1.0, tau2: float = 1.0):
    return fastguide.ClassifierGuidance(classifier, digits.OFFSHELF_SCALE, input=input, tau1=tau1, tau2=tau2)


def configs(bundle: digits.Bundle) -> List[Config]:
    """The main table: every method on the conditional model, classifier methods on the unconditional one."""
    out = []
    ece_of = {"adm": (bundle.noisy_classifier, "xt"), "offshelf_xt": (bundle.clean_classifier, "xt"),
              "offshelf": (bundle.smoothed_clean_classifier(digits.SOFTPLUS_BETA), "x0")}
    for name in digits.METHODS:
        clf, inp = ece_of.get(name, (None, "xt"))
        out.append(Config(name, "conditional", digits.guidance(name, bundle), clf, inp))
    for name in ("none", "adm", "offshelf_xt", "offshelf"):
        clf, inp = ece_of.get(name, (None, "xt"))
        out.append(Config(name, "unconditional", digits.guidance(name, bundle), clf, inp))
    return out


ABLATION_SETTING = "unconditional"


def ablation_configs(bundle: digits.Bundle) -> List[Config]:
    """Ma et al.'s design choices added one at a time to naive off-the-shelf guidance (same scale)."""
    clean = bundle.clean_classifier
    smooth = bundle.smoothed_clean_classifier(digits.SOFTPLUS_BETA)
    s = ABLATION_SETTING
    return [Config("x_t (naive)", s, [_classifier_spec(clean, "xt")], clean, "xt"),
            Config("x0^", s, [_classifier_spec(clean, "x0")], clean, "x0"),
            Config("+ softplus", s, [_classifier_spec(smooth, "x0")], smooth, "x0"),
            Config("+ joint temperatures", s, [_classifier_spec(smooth, "x0", digits.TAU1, digits.TAU2)], smooth, "x0"),
            Config("+ sine schedule", s, digits.guidance("offshelf", bundle), smooth, "x0",
                   same_as=("offshelf", s))]


def _ece(bundle, cfg: Config, x_real, y_real, timesteps, cache: Dict) -> Optional[float]:
    if cfg.ece_classifier is None:
        return None
    key = (id(cfg.ece_classifier), cfg.ece_input, cfg.setting)
    if key not in cache:
        denoiser = None
        if cfg.ece_input == "x0":
            model = bundle.model
            labels = y_real if cfg.setting == "conditional" else None
            denoiser = lambda x, t: model(x, t, labels)  # noqa: E731 - the x0^ the guided model would make
        cache[key] = integral_ece(
            cfg.ece_classifier, x_real, y_real, schedule=bundle.schedule, timesteps=timesteps,
            input=cfg.ece_input, denoiser=denoiser, clip=bundle.clip, generator=torch.Generator().manual_seed(0))
    return cache[key]


def _run(bundle, cfg: Config, y, seed, steps, x_real, y_real, ece_steps, cache) -> Row:
    start = time.perf_counter()
    x = digits.sample(bundle, y, guidance_specs=cfg.specs, seed=seed, unconditional=cfg.setting == "unconditional",
                      steps=steps)
    seconds = time.perf_counter() - start
    return Row(cfg.name, cfg.setting, evaluate.class_accuracy(x, y), evaluate.fd_to_held_out(x),
               _ece(bundle, cfg, x_real, y_real, ece_steps, cache), seconds / len(y), x)


def _fmt(rows: Sequence[Row], title: str) -> List[str]:
    lines = [title, f"  {'method':24s} {'model':13s} {'class acc':>9s} {'FD':>7s} {'int. ECE':>8s} {'s/sample':>9s}"]
    for r in rows:
        ece = "-" if r.ece is None else f"{r.ece:8.3f}"
        lines.append(f"  {r.name:24s} {r.setting:13s} {r.accuracy:9.3f} {r.fd:7.1f} {ece:>8s} "
                     f"{r.seconds_per_sample:9.4f}")
    return lines


def band_labels(rows: Sequence[Row], ablation: Sequence[Row]) -> List[tuple]:
    """The PNG grid's row labels, one (method, model) pair of lines per band (two sample rows each)."""
    return [(r.name, f"{r.setting} model") for r in rows] + \
        [(r.name, f"ablation, {r.setting}") for r in ablation]


def write_grid(path: str, rows: Sequence[Row], ablation: Sequence[Row], per_class: int) -> bool:
    """The PNG grid of ``rows`` then ``ablation``: per row two samples of every class (columns 0-9), each
    band labelled with its method and model and each column with its class (Pillow); returns whether it is
    labelled (without Pillow the grid is written unlabelled)."""
    bands = [r.samples[: NUM_CLASSES * min(2, per_class)].reshape(-1, NUM_CLASSES, 1, 8, 8)
             for r in list(rows) + list(ablation)]
    try:
        image = evaluate.labelled_grid_image(bands, band_labels(rows, ablation),
                                             [str(c) for c in range(NUM_CLASSES)], corner="class")
        labelled = True
    except ImportError:  # no Pillow: the bare grid (the text file and stdout name the rows)
        image, labelled = evaluate.grid_image(bands), False
    evaluate.write_png(path, image)
    return labelled


def run_demo(out_dir: Optional[str] = None, *, quick: bool = False, per_class: Optional[int] = None,
             steps: Optional[int] = None, seed: int = 0, weights_dir: Optional[str] = None,
             log: Optional[Log] = print, progress: bool = False) -> DemoResult:
    """Sample every method, score it, print the tables and (with ``out_dir``) write ``digits_demo.png`` and
    ``digits_demo.txt``. ``quick`` (CI): 3 per class, 5 steps, ECE on 3 timesteps and 100 held-out digits.
    ``progress``: show each stage on stderr as it runs (``fastguide.tools.progress.Progress``).

    >>> run_demo("out")          # ~1 minute on a 2-core CPU
    """
    from fastguide.tools.progress import Progress

    say = log or (lambda _: None)
    with Progress(None, "fastguide demo", enabled=progress) as bar:
        bar.stage("loading the networks and the digits")
        bundle = digits.load(weights_dir)
        per_class = per_class or (3 if quick else 50)
        steps = steps or (5 if quick else bundle.steps)
        y = torch.arange(NUM_CLASSES).repeat(per_class)  # column j of the grid is class j
        x_real, y_real = load_real()
        if quick:
            x_real, y_real = x_real[:100], y_real[:100]
        sampler_ts = bundle.schedule.timesteps(steps)
        ece_steps = sampler_ts[:: max(1, len(sampler_ts) // 3)][:3] if quick else sampler_ts
        cache: Dict = {}
        main_cfgs, ablation_cfgs = configs(bundle), ablation_configs(bundle)
        main_keys = {(c.name, c.setting) for c in main_cfgs}
        to_sample = len(main_cfgs) + sum(c.same_as not in main_keys for c in ablation_cfgs)
        bar.set_total(1 + to_sample + 1 + bool(out_dir))
        bar.advance()

        def run(c: Config) -> Row:
            bar.stage(f"sampling and scoring {c.name} ({c.setting})")
            row = _run(bundle, c, y, seed, steps, x_real, y_real, ece_steps, cache)
            bar.advance()
            return row

        rows = [run(c) for c in main_cfgs]
        done = {(r.name, r.setting): r for r in rows}
        ablation = [replace(done[c.same_as], name=c.name) if c.same_as in done else run(c) for c in ablation_cfgs]
        bar.stage("scoring real digits (the floors)")
        result = DemoResult(rows, ablation, per_class, steps, evaluate.real_floor_fd(len(y)),
                            evaluate.evaluator_accuracy_on_held_out())
        bar.advance()
        if out_dir:
            bar.stage("writing the PNG grid")
            os.makedirs(out_dir, exist_ok=True)
            png = os.path.join(out_dir, "digits_demo.png")
            labelled = write_grid(png, rows, ablation, per_class)
            bar.advance()
    lines = [f"fastguide demo: sklearn digits, {per_class} samples per class per method, {bundle.sampler} "
             f"{steps} steps, seed {seed}",
             f"judge: SVC on raw training pixels (accuracy {result.judge_accuracy:.3f} on held-out real digits); "
             f"FD: pixel space vs {len(load_real()[0])} held-out digits "
             f"(real training digits, same count: {result.floor_fd:.1f})", ""]
    lines += _fmt(rows, "Every method (guidance specs from digits.guidance):")
    lines += [""] + _fmt(ablation, f"Ablation of Ma et al.'s choices on the off-the-shelf clean classifier "
                                   f"({ABLATION_SETTING} model, scale {digits.OFFSHELF_SCALE}, Softplus beta "
                                   f"{digits.SOFTPLUS_BETA}, tau1/tau2 {digits.TAU1}/{digits.TAU2}, "
                                   f"gamma {digits.GAMMA}):")
    result.table = "\n".join(lines)
    say(result.table)
    if out_dir:
        with open(os.path.join(out_dir, "digits_demo.txt"), "w") as f:
            f.write(result.table + "\n")
        order = ", ".join(f"{r.name} ({r.setting[:4]})" for r in rows + ablation)
        what = "labelled" if labelled else "unlabelled: pip install pillow for labels"
        say(f"\nwrote {png} ({what}; rows top to bottom: {order}; columns: classes 0-9) and digits_demo.txt")
    return result
