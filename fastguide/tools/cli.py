"""The ``fastguide`` command line: ``fastguide COMMAND [options]`` (also ``python -m fastguide``).

Every subcommand is registered on the parser built by ``build_parser``; its ``help=`` is its one line in
``fastguide --help``, which argparse lists from the subparsers, so a new subcommand appears there by being
added. ``bench`` owns its whole command line (``fastguide.tools.bench.main``); its entry here is for the
listing. ``Progress`` is the stderr progress display that the long commands share.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import List, Optional

import torch

import fastguide
from fastguide.examples.mixture import GaussianMixture
from fastguide.generation.cli import register as register_generation
from fastguide.serve.cli import register as register_serve
from fastguide.tools.progress import QUIET_HELP, Progress, progress_enabled, stderr_log  # noqa: F401

DESCRIPTION = """\
fastguide: fused, sync-free guided diffusion sampling for PyTorch.

For the options of a command: fastguide COMMAND --help"""

EPILOG = """\
examples:
  fastguide demo --quick         every guidance method on real digits, in seconds
  fastguide bench --quick        a short throughput benchmark on this machine
  fastguide backends             which kernel backends can run here

Long commands show progress on stderr when it is a terminal (--quiet turns it
off); results go to stdout."""

# ---------------------------------------------------------------------------------------------------
# Subcommands


def _mixture_demo(args) -> int:
    """Every guidance method on an exact Gaussian mixture, where the right answer is known."""
    torch.manual_seed(args.seed)
    classes = 4
    true_weights = torch.tensor([0.55, 0.25, 0.15, 0.05])
    mix = GaussianMixture.ring(classes=classes, weights=true_weights)
    schedule = fastguide.Schedule.ddpm()
    n, steps = args.samples, args.steps or 50
    y = torch.arange(n) % classes
    null = -1
    model = mix.eps_model(schedule, null_label=null)
    wrong = torch.full((classes,), 1.0 / classes)
    rows = []
    progress = Progress(total=7, desc="fastguide demo --mixture", enabled=progress_enabled(args.quiet))

    def run(name, net, labels, guidance, target):
        progress.stage(name.strip())
        gen = torch.Generator().manual_seed(args.seed)
        x_T = torch.randn(n, 2, 1, 1, generator=gen)
        t0 = time.perf_counter()
        x = fastguide.sample(net, x_T, schedule=schedule, sampler=args.sampler, steps=steps, y=labels,
                             guidance=guidance, generator=gen)
        seconds = time.perf_counter() - t0
        comp = mix.nearest_component(x)
        acc = (comp == y).double().mean().item() if target else float("nan")
        freq = torch.bincount(comp, minlength=classes).double() / n
        tv = 0.5 * (freq - true_weights.double()).abs().sum().item()
        spread = (x.double().flatten(1) - mix.means[comp]).square().sum(1).mean().sqrt().item()
        rows.append((name, acc, tv, spread, 1e3 * seconds / n))
        progress.advance()

    with progress:
        clf = mix.noisy_classifier(schedule)
        run("unconditional", model, torch.full_like(y, null), [], False)
        run("conditional (y)", model, y, [], True)
        run("CFG w=3", model, y, [fastguide.CFG(3.0, null_label=null)], True)
        uncond_model = mix.eps_model(schedule)
        run("ADM classifier s=1", lambda x, t, _y: uncond_model(x, t, None), y,
            [fastguide.ClassifierGuidance(clf, 1.0)], True)
        run("ADM classifier s=4", lambda x, t, _y: uncond_model(x, t, None), y,
            [fastguide.ClassifierGuidance(clf, 4.0)], True)
        wrong_model = mix.eps_model(schedule, weights=wrong)
        run("mis-specified model", lambda x, t, _y: wrong_model(x, t, None), None, [], False)
        run("  + discriminator guidance", lambda x, t, _y: wrong_model(x, t, None), None,
            [fastguide.DiscriminatorGuidance(mix.density_ratio_logit(schedule, wrong), weight=1.0)], False)

    weights = [round(w, 2) for w in true_weights.tolist()]
    print(f"fastguide demo: exact 2-D Gaussian mixture ({classes} classes, weights {weights}), "
          f"{n} samples, {args.sampler} {steps} steps, backends {fastguide.backends()}")
    print(f"{'method':30s} {'class acc':>9s} {'TV to true weights':>18s} {'spread':>7s} {'ms/sample':>9s}")
    for name, acc, tv, spread, ms in rows:
        acc_s = "-" if acc != acc else f"{acc:9.3f}"
        print(f"{name:30s} {acc_s:>9s} {tv:18.3f} {spread:7.3f} {ms:9.4f}")
    print("class acc: samples nearest the requested class mean. Exact guidance at scale 1 reproduces the\n"
          "conditional model (acc ~1); discriminator guidance moves the mis-specified model's mode weights\n"
          "back to the true ones (TV shrinks). spread: RMS distance to the nearest mean (component std "
          f"{2 ** 0.5 * mix.var ** 0.5:.3f}).")
    return 0


def _set_threads(threads: int) -> None:
    # The digits networks run tiny convolutions on 8x8 images: intra-op threads barely help, and on a busy
    # machine their spin-waiting makes a run several times slower, so the default is one thread.
    if threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(threads)


def _require_digits_extras() -> None:
    """The digits demo and training need scikit-learn (the data, the judge) and safetensors (the weights)."""
    import importlib.util

    missing = [m for m, mod in (("scikit-learn", "sklearn"), ("safetensors", "safetensors"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit(f"the digits demo needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                         f"(or run `fastguide demo --mixture`, which needs neither)")


def _demo(args) -> int:
    if args.mixture:
        return _mixture_demo(args)
    _require_digits_extras()
    from fastguide.examples.digits.demo import run_demo

    _set_threads(args.threads)
    start = time.perf_counter()
    run_demo(args.out, quick=args.quick, per_class=args.per_class, steps=args.steps, seed=args.seed,
             weights_dir=args.weights, progress=progress_enabled(args.quiet))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def _train_digits(args) -> int:
    _require_digits_extras()
    from fastguide.examples.digits import WEIGHTS_DIR
    from fastguide.examples.digits.train import TrainConfig, train_all

    _set_threads(args.threads)
    out = args.out or WEIGHTS_DIR
    start = time.perf_counter()
    paths = train_all(out, TrainConfig(seed=args.seed), log=stderr_log(progress_enabled(args.quiet)))
    print(f"trained the digits networks (seed {args.seed}) in {time.perf_counter() - start:.0f} s: "
          f"{', '.join(os.path.basename(p) for p in paths.values())} in {out}")
    return 0


def _backends(args) -> int:
    for name, why in fastguide.backends(reasons=True).items():
        print(f"{name:8s} {'available' if not why else 'unavailable: ' + why}")
    return 0


def _bench_placeholder(args) -> int:  # never reached: main() hands `bench ...` to bench.main first
    from fastguide.tools import bench
    return bench.main([])


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks (``_paragraphs`` wraps them) and keeps each command's
    help on its name's line: argparse (before 3.13) measures the command names without the extra indent it
    prints them with, so a long name such as ``train-digits`` would push its help onto a line of its own."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            longest = max(map(len, action.choices), default=0)
            self._action_max_length = max(self._action_max_length, longest + self._current_indent + 2)


def _paragraphs(*texts: str) -> str:
    """Paragraphs wrapped to 79 columns, for descriptions (the formatter keeps line breaks as written)."""
    return "\n\n".join(textwrap.fill(t, 79) for t in texts)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastguide`` parser. Add a subcommand with ``sub.add_parser(name, help=ONE_LINE, description=...)``:
    its ``help`` is its line in ``fastguide --help`` (keep it under ~50 characters so it stays one line)."""
    parser = argparse.ArgumentParser(prog="fastguide", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastguide {fastguide.__version__}",
                        help="print the fastguide version and exit")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)

    demo = command("demo", "every guidance method on real digits, scored",
                   _paragraphs("Sample every guidance method (none, CFG, ADM classifier guidance, naive and "
                               "Ma et al. off-the-shelf classifier guidance, discriminator guidance) with the "
                               "shipped digits networks, score the samples with judges no method uses (class "
                               "accuracy, Frechet distance, integral ECE), print the table and write a "
                               "labelled PNG grid and the table to --out.",
                               "With --mixture: the same methods on an exact 2-D Gaussian mixture, where the "
                               "right answers are known."))
    demo.add_argument("--out", default="fastguide_demo", help="where the digits demo writes its PNG grid and table "
                      "(default: ./fastguide_demo)")
    demo.add_argument("--quick", action="store_true", help="a few samples and steps: seconds, for CI")
    demo.add_argument("--per-class", type=int, default=None, help="digits samples per class and method (default 50)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (digits default 25, mixture 50)")
    demo.add_argument("--weights", default=None, help="digits weights directory (default: the shipped ones)")
    demo.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the initial noise (default 0)")
    demo.add_argument("--mixture", action="store_true", help="the exact Gaussian-mixture demo instead")
    demo.add_argument("--samples", type=int, default=2000, help="mixture demo: samples per method (default 2000)")
    demo.add_argument("--sampler", default="ddim", choices=fastguide.samplers.SAMPLERS[:2],
                      help="mixture demo: sampler (default ddim)")
    demo.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    demo.set_defaults(func=_demo)

    bench = command("bench", "guided sampling throughput, fastguide vs diffusers",
                    _paragraphs("End-to-end guided sampling throughput on this machine. Its options: "
                                "fastguide bench --help"))
    bench.set_defaults(func=_bench_placeholder)

    train = command("train-digits", "retrain the digits networks (seeded, CPU minutes)",
                    _paragraphs("Train the four digits networks (conditional UNet, noisy and clean "
                                "classifiers, discriminator) on the scikit-learn digits training split, seeded, "
                                "and save them as safetensors."))
    train.add_argument("--out", default=None, help="output directory (default: the package's shipped weights)")
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0, as the shipped weights)")
    train.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    train.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    train.set_defaults(func=_train_digits)

    backends = command("backends", "which kernel backends can run here",
                       _paragraphs("List the kernel backends (torch, cpp, triton, cuda) and why any cannot "
                                   "run here."))
    backends.set_defaults(func=_backends)
    # New subcommands (serve, generate, evaluate, ...) go here, through command(): `fastguide --help` lists them.
    register_generation(sub, formatter_class=_HelpFormatter)  # generate, evaluate (fastguide.generation)
    register_serve(sub, formatter_class=_HelpFormatter)  # serve (fastguide.serve; Starlette + uvicorn on use)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``fastguide`` and ``python -m fastguide``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its whole command line (fastguide bench --help)
        from fastguide.tools import bench
        return bench.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `fastguide`: say what it can do
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
