"""Building the benchmark's cases and measuring them: contenders interleaved within each repeat, medians,
networks timed alone, sampler ops counted."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastguide.native import cudagraph
from fastguide.tools.opcount import OpCounter
from fastguide.tools.progress import Progress

from .contenders import (NULL_LABEL, NUM_CLASSES, SHAPE, FreeNet, SmallClassifier, SmallUNet,
                         diffusers_cfg_loop, fastguide_cfg, fastguide_classifier, gd_cond_fn_loop, k_diffusion_cfg)

# ---------------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable, device: torch.device) -> float:
    """Seconds of one call, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def count_ops(fn: Callable) -> int:
    with OpCounter() as counter:
        fn()
    return counter.count


@dataclass
class Case:
    """One configuration: its contenders, the networks' calls per step alone, and the results."""

    section: str
    network: str
    batch: int
    steps: int
    guidance: str
    baseline: str
    contenders: Dict[str, Callable] = field(default_factory=dict)
    counted: Sequence[str] = ()           # contenders whose ops are counted (eager ones)
    networks_alone: Optional[Callable] = None  # one step's network calls, by themselves
    notes: Dict[str, str] = field(default_factory=dict)
    times: Dict[str, List[float]] = field(default_factory=dict)


def _free_or_unet(name: str):
    return FreeNet() if name == "free" else SmallUNet()


def build_cases(device: torch.device, quick: bool) -> List[Case]:
    steps = 20 if quick else 50
    cases: List[Case] = []
    gen = torch.Generator().manual_seed(0)
    try:
        import k_diffusion  # noqa: F401
        k_note = ""
    except ImportError:
        k_note = ("k_diffusion is not installed: k-diffusion contender skipped (pip install k-diffusion; here its "
                  "dependencies would replace the installed torch)")
    cuda = device.type == "cuda"
    graphs = cudagraph.driver.supports(device)   # (the tests drive this path on the CPU with a stand-in)
    networks = {"free": FreeNet().to(device), "unet": SmallUNet().to(device)}
    for net in networks.values():
        net.eval()
    cfg_grid = [("free", 1), ("free", 8), ("unet", 1)] if quick else \
        [(n, b) for n in ("free", "unet") for b in (1, 8, 64)]
    for name, batch in cfg_grid:
        net = networks[name]
        x_T = torch.randn((batch,) + SHAPE, generator=gen).to(device)
        y = (torch.arange(batch) % NUM_CLASSES).to(device)
        case = Case("cfg", name, batch, steps, "CFG w=4 (DDIM)", "diffusers",
                    counted=("diffusers", "fastguide-dropin", "fastguide-eager"))
        case.contenders["diffusers"] = diffusers_cfg_loop(net, x_T, y, steps)
        case.contenders["fastguide-dropin"] = diffusers_cfg_loop(net, x_T, y, steps, dropin=True)
        case.contenders["fastguide-eager"] = fastguide_cfg(net, x_T, y, steps)
        # Compiling the UNet on two CPU cores takes minutes: the quick run compiles the free network only.
        if not (quick and name == "unet"):
            case.contenders["fastguide-inductor"] = fastguide_cfg(net, x_T, y, steps, compile="inductor")
        if cuda:
            case.contenders["fastguide-inductor-ro"] = fastguide_cfg(net, x_T, y, steps, compile="inductor",
                                                                     compile_options={"mode": "reduce-overhead"})
        if graphs:
            case.contenders["fastguide-graph"] = fastguide_cfg(net, x_T, y, steps, compile="graph")
        if k_note:
            case.notes["k-diffusion"] = k_note
        else:
            case.contenders["k-diffusion"] = k_diffusion_cfg(net, x_T, y, steps)
            case.counted = tuple(case.counted) + ("k-diffusion",)
        x_pair = torch.cat([x_T, x_T])
        t_pair = torch.full((2 * batch,), 500.0, device=device)
        y_pair = torch.cat([torch.full_like(y, NULL_LABEL), y])
        case.networks_alone = lambda net=net, x=x_pair, t=t_pair, yy=y_pair: net(x, t, yy)
        cases.append(case)

    clf = SmallClassifier().to(device)
    clf_grid = [("free", 8)] if quick else [("free", 8), ("unet", 8)]
    for name, batch in clf_grid:
        x_T = torch.randn((batch,) + SHAPE, generator=gen).to(device)
        y = (torch.arange(batch) % NUM_CLASSES).to(device)
        null = torch.full((batch,), NULL_LABEL, device=device)
        # Classifier guidance steers the unconditional model: the class-conditional UNet gets the null label.
        net = (lambda x, t, _y=None, net=networks[name], null=null: net(x, t, null))
        for method, label in (("adm", "ADM classifier (DDPM)"), ("ma", "Ma et al. x0 classifier (DDPM)")):
            case = Case("classifier", name, batch, steps, label, "gd-cond_fn",
                        counted=("gd-cond_fn", "fastguide-eager"))
            case.contenders["gd-cond_fn"] = gd_cond_fn_loop(net, clf, x_T, y, steps, method)
            case.contenders["fastguide-eager"] = fastguide_classifier(net, clf, x_T, y, steps, method)
            if not quick and name == "free":  # (the UNet's compile with autograd takes minutes on CPU)
                case.contenders["fastguide-inductor"] = fastguide_classifier(net, clf, x_T, y, steps, method,
                                                                             compile="inductor")
            if graphs:
                case.contenders["fastguide-graph"] = fastguide_classifier(net, clf, x_T, y, steps, method,
                                                                          compile="graph")
            t_b = torch.full((batch,), 500.0, device=device)

            def alone(net=net, clf=clf, x=x_T, t=t_b):
                net(x, t, None)
                with torch.enable_grad():
                    leaf = x.detach().requires_grad_(True)
                    torch.autograd.grad(clf(leaf, t).sum(), leaf)

            case.networks_alone = alone
            cases.append(case)
    return cases


def _case_label(case: Case) -> str:
    return f"{case.section}:{case.network}/B{case.batch}" + ("" if case.section == "cfg" else
                                                             f"/{case.guidance.split()[0]}")


def measure(cases: List[Case], device: torch.device, repeats: int, sample_s: float,
            progress=None) -> List[dict]:
    """Warm every contender up (compiles, captures), then time them interleaved ``repeats`` times; each timed
    sample runs a contender's loop often enough to last about ``sample_s`` seconds (timer and scheduler
    noise of these shared cores would swamp a single sub-millisecond loop). ``progress``: a
    ``fastguide.tools.progress.Progress`` told each stage (warm-ups, repeats, op counts) as it starts and ends."""
    if progress is None:
        progress = Progress(None, "", enabled=False)
    progress.set_total(sum(len(c.contenders) + 1 for c in cases) + repeats + len(cases))
    inner: Dict[tuple, int] = {}
    for case in cases:
        case.contenders["_networks"] = lambda c=case: [c.networks_alone() for _ in range(c.steps)]
        for name, fn in case.contenders.items():
            progress.stage(f"warm-up {_case_label(case)} {name.lstrip('_')}")
            fn()
            inner[(id(case), name)] = max(1, math.ceil(sample_s / max(time_once(fn, device), 1e-6)))
            progress.advance()
    for r in range(repeats):
        progress.stage(f"timing, repeat {r + 1}/{repeats}")
        for case in cases:
            for name, fn in case.contenders.items():
                n = inner[(id(case), name)]
                case.times.setdefault(name, []).append(time_once(lambda: [fn() for _ in range(n)], device) / n)
        progress.advance()
    for case in cases:
        del case.contenders["_networks"]
    rows = []
    for case in cases:
        progress.stage(f"counting ops {_case_label(case)}")
        net_ops = count_ops(case.networks_alone)
        net_ms = 1e3 * statistics.median(case.times["_networks"]) / case.steps
        base_ms = 1e3 * statistics.median(case.times[case.baseline]) / case.steps
        for name, fn in case.contenders.items():
            ms = 1e3 * statistics.median(case.times[name]) / case.steps
            ops = ""
            if name in case.counted:
                ops = f"{(count_ops(fn) - case.steps * net_ops) / case.steps:.1f}"
            rows.append(dict(section=case.section, network=case.network, batch=case.batch, steps=case.steps,
                             guidance=case.guidance, contender=name,
                             samples_per_s=case.batch / (ms * case.steps / 1e3), ms_per_step=ms,
                             net_ms_per_step=net_ms, overhead_ms_per_step=ms - net_ms,
                             speedup=base_ms / ms, sampler_ops_per_step=ops, note=""))
        for name, note in case.notes.items():
            rows.append(dict(section=case.section, network=case.network, batch=case.batch, steps=case.steps,
                             guidance=case.guidance, contender=name, samples_per_s="", ms_per_step="",
                             net_ms_per_step="", overhead_ms_per_step="", speedup="", sampler_ops_per_step="",
                             note=note))
        progress.advance()
    return rows
