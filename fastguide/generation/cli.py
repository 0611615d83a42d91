"""``fastguide generate`` and ``fastguide evaluate``: ``register(subparsers)`` adds both to a CLI.

  fastguide generate --model digits --method cfg --seeds 0-49999 --out run        one process
  torchrun --standalone --nproc_per_node 8 -m fastguide generate ... --out run     eight (same set)
  fastguide evaluate run                                                           the digits judge's scores
"""

from __future__ import annotations

import argparse
import json
import sys

from .generate import DEFAULT_BATCH, DEFAULT_SHARD_SIZE, DEFAULT_TIMEOUT, GenerateConfig, GenerationError

GENERATE_EPILOG = """\
seeds: each sample's label, initial noise and step noise come from torch.Generator().manual_seed(seed), so
the set depends on the seeds (and the configuration), not on the number of processes or the batch size.
Run the same command again to resume a killed run, with any number of processes: valid shards are kept,
missing or corrupt ones redone. A different configuration into the same --out is refused.

output: OUT/samples.npz (arr_0 uint8 [N, H, W, C], arr_1 int64 labels, seeds int64; seed order),
OUT/shards/shard_NNNNN.npz (float32 samples, labels, seeds) with .json checksum sidecars, OUT/manifest.json.

examples:
  fastguide generate --model digits --method cfg --cfg-scale 2 --seeds 0-9999 --out run
  torchrun --standalone --nproc_per_node 4 -m fastguide generate --model digits --seeds 0-49999 --out run
  fastguide generate --model mypkg.models:imagenet64 --method cfg --seeds 0-49999 --batch 256 --out run
"""


def _label(text: str):
    if text in ("random", "cycle"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a class index, 'random' or 'cycle', got {text!r}") from None


def register(subparsers, formatter_class=argparse.RawDescriptionHelpFormatter) -> None:
    """Add the ``generate`` and ``evaluate`` subcommands to an ``argparse`` subparsers object."""
    gen = subparsers.add_parser(
        "generate", help="seeded sample sets: resumable, on torchrun",
        description="Generate a seeded sample set into --out, on one process or, under torchrun, many (the\n"
                    "same set either way); rerun the same command to resume.",
        epilog=GENERATE_EPILOG, formatter_class=formatter_class)
    gen.add_argument("--model", default="digits", help="'digits' or package.module:factory returning a "
                     "fastguide.generation.ModelSpec (default digits)")
    gen.add_argument("--method", default="none", help="guidance method of the model (digits: none, cfg, adm, "
                     "offshelf_xt, offshelf, dg; default none)")
    gen.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (method cfg)")
    gen.add_argument("--classifier-scale", type=float, default=None,
                     help="classifier guidance scale (digits methods adm, offshelf_xt, offshelf)")
    gen.add_argument("--dg-weight", type=float, default=None, help="discriminator guidance weight (method dg)")
    gen.add_argument("--seeds", required=True, help="seeds, e.g. 0-49999 or 0-9,20,30-31 (one sample each)")
    gen.add_argument("--label", type=_label, default=None,
                     help="class of every sample, 'random' (default: drawn from each seed's generator) or "
                          "'cycle' (seed mod the class count)")
    gen.add_argument("--unconditional", action="store_true",
                     help="the model without its class input (the class comes from the guidance alone)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    gen.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    gen.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                     help=f"samples per network call (default {DEFAULT_BATCH}; may differ on resume)")
    gen.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                     help=f"seeds per shard file (default {DEFAULT_SHARD_SIZE}; fixed for a run directory)")
    gen.add_argument("--out", required=True, help="run directory (created; reruns resume it)")
    gen.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else CPU), cpu, cuda[:N]")
    gen.add_argument("--backend", default="auto", help="fastguide.sample backend (default auto)")
    gen.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    gen.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                     help=f"seconds before a stalled job gives up (process group and end-of-run wait; "
                          f"default {DEFAULT_TIMEOUT:.0f})")
    gen.add_argument("--quiet", action="store_true", help="no progress or messages on stderr (progress is "
                     "shown only when stderr is a terminal)")
    gen.set_defaults(func=_generate_command)

    ev = subparsers.add_parser("evaluate", help="score a generated set (digits: accuracy, FD)",
                               description="Score DIR/samples.npz with its model's evaluator (digits: the\n"
                                           "demo's judge accuracy, Frechet distance, per-class counts).",
                               formatter_class=formatter_class)
    ev.add_argument("dir", help="a run directory written by fastguide generate")
    ev.add_argument("--model", default=None, help="the model (default: the one in DIR/manifest.json)")
    ev.add_argument("--source", default="auto", choices=("auto", "float", "uint8"),
                    help="score the float shards (exact) or the uint8 images of samples.npz; auto prefers "
                         "the float shards when all are valid")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    ev.set_defaults(func=_evaluate_command)


def _fail(command: str, error: Exception) -> int:
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
        print(f"fastguide {command}: error: {error}", file=sys.stderr)
    return 2


def _generate_command(args) -> int:
    from .generate import generate

    options = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("classifier_scale", args.classifier_scale),
                                 ("dg_weight", args.dg_weight)) if v is not None}
    config = GenerateConfig(out=args.out, seeds=args.seeds, model=args.model, method=args.method, options=options,
                            steps=args.steps, sampler=args.sampler, label=args.label, unconditional=args.unconditional,
                            shard_size=args.shard_size, batch=args.batch, device=args.device, backend=args.backend,
                            threads=args.threads, timeout=args.timeout, quiet=args.quiet)
    try:
        generate(config)
    except GenerationError as e:
        return _fail("generate", e)
    return 0


def _evaluate_command(args) -> int:
    from .evaluate import evaluate, format_scores

    try:
        scores = evaluate(args.dir, args.model, source=args.source)
    except (GenerationError, ValueError) as e:
        return _fail("evaluate", e)
    print(json.dumps(scores, indent=1) if args.json else format_scores(scores))
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m fastguide.generation.cli generate ...``), for trees whose main CLI lacks
    the subcommands."""
    parser = argparse.ArgumentParser(prog="fastguide")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
