"""``fastguide.generation.generate``: a seeded sample set, sharded, resumable, on any number of processes.

The set is defined by seeds, not by ranks. Sample ``s`` is drawn from ``torch.Generator().manual_seed(s)``:
first its label (one ``randint(num_classes)``, drawn whatever the label mode so the noise never depends on
it), then its initial noise ``randn(1, *sample_shape)``, then every stochastic step's noise (the generator
goes to ``fastguide.sample`` in a list of one generator per sample). The sorted seeds are cut into shards of
``shard_size`` and each shard into batches of ``batch``, so a batch's members — and therefore its float
rounding — do not depend on the world size: 1, 2 or 3 processes write bitwise identical shards. Pending
shards are dealt to ranks round-robin.

A run killed at any moment loses at most the batches in flight: every finished batch of an unfinished shard
is kept as a checked partial file, every finished shard as a checked shard file (``store``), and the same
command resumes — with any number of processes — skipping valid files and redoing missing, truncated or
corrupt ones. Rank 0 then verifies every shard and assembles ``samples.npz``.

>>> from fastguide.generation import GenerateConfig, generate
>>> result = generate(GenerateConfig(out="run", seeds="0-999", model="digits", method="cfg", steps=25))
>>> result.samples_path
'run/samples.npz'
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

import fastguide

from . import comm as _comm
from . import store
from .models import ModelSpec, load_model, option_flag, resolve_options
from ..tools.progress import Progress
from .seeds import SeedSpecError, assign, batches, format_seeds, parse_seeds, shard_seeds

FORMAT = "fastguide-generate/1"
DEFAULT_SHARD_SIZE = 500
DEFAULT_BATCH = 64
DEFAULT_TIMEOUT = 1800.0


class GenerationError(ValueError):
    """A run that cannot start or finish (bad argument, unusable --out, a different configuration in it)."""


@dataclass
class GenerateConfig:
    """Everything a generation run needs; what defines the sample set is recorded in ``manifest.json``.

    * ``out``: the run directory; ``seeds``: a seed spec (``"0-49999"``, ``"0-9,20"``) or a list of ints.
    * ``model``: ``"digits"`` or ``"package.module:factory"`` (see ``fastguide.generation.models``).
    * ``method`` and ``options`` (e.g. ``{"cfg_scale": 3.0}``): the model's guidance method and its options.
    * ``steps`` / ``sampler``: ``None`` takes the model's defaults.
    * ``label``: ``None`` or ``"random"`` (drawn from each seed's generator), ``"cycle"`` (seed mod classes),
      or a class index for every sample. ``unconditional``: the model without its class input (the class,
      if any, then comes from the guidance; the labels are still recorded as the samples' targets).
    * ``shard_size``: seeds per shard (part of the set's identity: resuming needs the same value).
    * Not part of the identity (free to change between a run and its resume): ``batch`` (seeds per
      network call; only float rounding depends on it), ``device`` (``auto``: this rank's GPU, else CPU),
      ``backend`` (``fastguide.sample``'s), ``threads`` (torch intra-op threads; ``None`` leaves them),
      ``timeout`` (seconds: the process group's collectives, and how long the end-of-run wait tolerates no
      progress from the other ranks — keep it above the time of one batch), ``quiet``, ``progress``
      (``None``: a bar on rank 0 when stderr is a terminal and not ``quiet``).
    """

    out: str
    seeds: Union[str, int, Sequence[int]]
    model: str = "digits"
    method: str = "none"
    options: Dict[str, float] = field(default_factory=dict)
    steps: Optional[int] = None
    sampler: Optional[str] = None
    label: Union[None, int, str] = None
    unconditional: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    batch: int = DEFAULT_BATCH
    device: str = "auto"
    backend: str = "auto"
    threads: Optional[int] = None
    timeout: float = DEFAULT_TIMEOUT
    quiet: bool = False
    progress: Optional[bool] = None


@dataclass
class GenerateResult:
    """What a rank did. ``samples_path`` is set on rank 0 (which assembles it), ``None`` elsewhere."""

    out: str
    samples_path: Optional[str]
    num_samples: int
    num_shards: int
    generated: int          # samples sampled by this run (all ranks)
    reused: int             # samples found valid on disk (shards and partial batches)
    seconds: float          # wall time of the sampling phase (all ranks done)
    samples_per_s: float
    rank: int = 0
    world_size: int = 1
    redone: Dict[int, str] = field(default_factory=dict)  # shard -> why its existing file was redone


@dataclass
class _Plan:
    config: GenerateConfig
    spec: ModelSpec
    seeds: List[int]
    shards: List[List[int]]
    identity: Dict[str, Any]
    config_id: str
    guidance: List
    net: Any
    sampler: str
    steps: int
    label: Union[str, int]
    device: torch.device


def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenerationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_arguments(config: GenerateConfig):
    """The plain arguments: returns (sorted seeds, device)."""
    if not isinstance(config, GenerateConfig):
        raise GenerationError(f"generate() takes a GenerateConfig, got {type(config).__name__}")
    if not isinstance(config.out, (str, os.PathLike)) or not str(config.out):
        raise GenerationError(f"--out must be a directory path, got {config.out!r}")
    try:
        seeds = parse_seeds(config.seeds)
    except SeedSpecError as e:
        raise GenerationError(str(e)) from None
    _positive_int("--shard-size", config.shard_size)
    _positive_int("--batch", config.batch)
    _positive_int("--steps", config.steps, allow_none=True)
    _positive_int("--threads", config.threads, allow_none=True)
    if isinstance(config.timeout, bool) or not isinstance(config.timeout, (int, float)) or not config.timeout > 0:
        raise GenerationError(f"--timeout must be a positive number of seconds, got {config.timeout!r}")
    if not isinstance(config.unconditional, bool):
        raise GenerationError(f"unconditional must be a bool, got {config.unconditional!r}")
    if not isinstance(config.options, dict):
        raise GenerationError(f"options must be a dict of guidance options, got {type(config.options).__name__}")
    if config.sampler is not None and config.sampler not in fastguide.samplers.SAMPLERS:
        raise GenerationError(f"--sampler must be one of {', '.join(fastguide.samplers.SAMPLERS)}, "
                              f"got {config.sampler!r}")
    if not isinstance(config.method, str):
        raise GenerationError(f"--method must be a method name, got {config.method!r}")
    if not isinstance(config.device, str):
        raise GenerationError(f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {config.device!r}")
    try:
        device = _comm.pick_device(config.device)
    except (RuntimeError, ValueError) as e:
        raise GenerationError(f"--device {config.device!r}: {e}") from None
    try:
        from fastguide.backends import dispatch

        dispatch.resolve(config.backend, device)
    except (ValueError, RuntimeError, TypeError) as e:
        raise GenerationError(f"--backend {config.backend!r}: {e}") from None
    return seeds, device


def _load_spec(config: GenerateConfig):
    """The model and its method's resolved options: returns (spec, options)."""
    try:
        spec = load_model(config.model)
    except (ValueError, TypeError) as e:
        raise GenerationError(str(e)) from None
    except FileNotFoundError as e:
        raise GenerationError(f"--model {config.model!r}: {e}") from None
    try:
        return spec, resolve_options(spec, config.method, config.options)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def _resolve_label(config: GenerateConfig, spec: ModelSpec) -> Union[str, int]:
    label = "random" if config.label is None else config.label
    if isinstance(label, str) and label.lstrip("-").isdigit():
        label = int(label)
    if isinstance(label, bool) or not (label in ("random", "cycle") or isinstance(label, int)):
        raise GenerationError(f"--label must be a class index, 'random' or 'cycle', got {config.label!r}")
    if spec.num_classes is None:
        if config.label is not None and label != "random":
            raise GenerationError(f"--label {config.label!r}: model {spec.name} has no classes")
    elif isinstance(label, int) and not 0 <= label < spec.num_classes:
        raise GenerationError(f"--label {label} is not a class of model {spec.name} (0..{spec.num_classes - 1})")
    return label


def _guidance(config: GenerateConfig, spec: ModelSpec, options: Dict[str, float]) -> List:
    try:
        guidance = list(spec.guidance(config.method, **options))
    except (ValueError, TypeError) as e:
        flags = " ".join(f"{option_flag(k)} {v:g}" for k, v in options.items())
        raise GenerationError(f"--method {config.method} {flags}: {e}") from None
    if spec.num_classes is None and any(isinstance(g, fastguide.ClassifierGuidance) for g in guidance):
        raise GenerationError(f"--method {config.method}: classifier guidance needs labels, and model "
                              f"{spec.name} has no classes")
    return guidance


def _resolve(config: GenerateConfig) -> _Plan:
    """Check every argument and build the run's plan (loads the model); raises ``GenerationError``."""
    seeds, device = _check_arguments(config)
    spec, options = _load_spec(config)
    label = _resolve_label(config, spec)
    if config.unconditional and config.method == "cfg":
        raise GenerationError("--unconditional with --method cfg: classifier-free guidance needs the "
                              "conditional model (drop --unconditional)")
    try:
        net = spec.conditional(config.unconditional)
    except ValueError as e:
        raise GenerationError(f"--unconditional: {e}") from None
    sampler = config.sampler or spec.sampler
    steps = config.steps or spec.steps
    try:
        fastguide.samplers.build(sampler, spec.schedule, steps)
    except (ValueError, TypeError) as e:
        raise GenerationError(f"--sampler {sampler} --steps {steps}: {e}") from None
    guidance = _guidance(config, spec, options)
    spec.to(device)
    identity = {
        "format": FORMAT, "fastguide_version": fastguide.__version__,
        "model": config.model, "method": config.method, "options": options,
        "unconditional": config.unconditional, "label": label, "sampler": sampler, "steps": steps,
        "clip": None if spec.clip is None else [float(c) for c in spec.clip],
        "sample_shape": list(spec.sample_shape), "num_classes": spec.num_classes, "null_label": spec.null_label,
        "seeds": format_seeds(seeds), "num_seeds": len(seeds), "shard_size": config.shard_size,
    }
    config_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return _Plan(config, spec, seeds, shard_seeds(seeds, config.shard_size), identity, config_id, guidance, net,
                 sampler, steps, label, device)


# ---------------------------------------------------------------------------------------------------------
# The run directory.

def _describe_differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = [k for k in list(new) + [k for k in old if k not in new] if old.get(k) != new.get(k)]

    def show(v):
        s = repr(v)
        return s if len(s) <= 60 else s[:57] + "..."
    return "; ".join(f"{k}: {show(old.get(k))} there, {show(new.get(k))} now" for k in keys)


def _prepare_dir(plan: _Plan) -> Optional[str]:
    """Rank 0: create and probe ``--out``, check or write its manifest, clear dead temporaries. Returns an
    error message (sent to every rank), or None."""
    out = str(plan.config.out)
    try:
        os.makedirs(os.path.join(out, store.SHARDS, store.PARTIAL), exist_ok=True)
    except OSError as e:
        return f"--out {out}: cannot create the run directory ({e.strerror or e})"
    for directory in (out, os.path.join(out, store.SHARDS), os.path.join(out, store.SHARDS, store.PARTIAL)):
        probe = os.path.join(directory, f".fastguide-probe-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
            os.unlink(probe)
        except OSError as e:
            return f"--out {out}: {directory} is not writable ({e.strerror or e})"
    manifest_path = os.path.join(out, store.MANIFEST)
    manifest = None
    if os.path.exists(manifest_path):
        try:
            manifest = store.read_json(manifest_path)
            old = manifest["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return (f"--out {out}: {manifest_path} is unreadable ({e}); it is written atomically, so it was "
                    f"damaged from outside: use a new --out, or delete the directory to start over")
        if old != plan.identity:
            return (f"--out {out} holds a run with another configuration ({_describe_differences(old, plan.identity)})"
                    f"; refusing to mix sample sets: use a new --out, or delete {out} to start over")
    elif store.existing_shards(out):
        return (f"--out {out}: {os.path.join(out, store.SHARDS)} holds shards but there is no {store.MANIFEST}; "
                f"refusing to mix sample sets: use a new --out")
    store.remove_quietly(store.stale_temporaries(out))
    now = _now()
    manifest = manifest or {"format": FORMAT, "created": now, "config": plan.identity, "config_id": plan.config_id,
                            "runs": []}
    manifest.update(status="running", updated=now, num_shards=len(plan.shards), config_id=plan.config_id)
    try:
        store.write_json(manifest_path, manifest)
    except OSError as e:
        return f"--out {out}: cannot write {manifest_path} ({e.strerror or e})"
    return None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _check_shards(plan: _Plan, indices: Sequence[int]) -> Dict[int, Optional[str]]:
    """Shard index -> None when its file is valid, else why it must be (re)done ("missing" when absent)."""
    out = str(plan.config.out)
    status: Dict[int, Optional[str]] = {}
    for i in indices:
        try:
            store.read_checked(store.shard_path(out, i), plan.config_id, plan.shards[i])
            status[i] = None
        except store.Invalid as e:
            status[i] = str(e)
    return status


# ---------------------------------------------------------------------------------------------------------
# Sampling.

def sample_seeds(plan: _Plan, seeds: Sequence[int]):
    """Float samples [n, *sample_shape] (CPU), labels int64 [n] of ``seeds``: one batch, one generator per seed."""
    spec = plan.spec
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if spec.num_classes is not None:
        drawn = [int(torch.randint(spec.num_classes, (1,), generator=g)) for g in gens]
        if plan.label == "random":
            labels = drawn
        elif plan.label == "cycle":
            labels = [int(s) % spec.num_classes for s in seeds]
        else:
            labels = [int(plan.label)] * len(seeds)
    else:
        labels = [-1] * len(seeds)
    x_T = torch.cat([torch.randn((1,) + tuple(spec.sample_shape), generator=g) for g in gens])
    device = plan.device
    y = torch.tensor(labels, dtype=torch.long, device=device) if spec.num_classes is not None else None
    x = fastguide.sample(plan.net, x_T.to(device), schedule=spec.schedule, sampler=plan.sampler, steps=plan.steps,
                         y=y, guidance=plan.guidance, generator=gens, clip_denoised=spec.clip,
                         backend=plan.config.backend)
    return x.detach().float().cpu().numpy(), np.asarray(labels, dtype=np.int64)


def _provenance(plan: _Plan, comm: _comm.Comm) -> Dict[str, Any]:
    device = plan.device
    return {"config_id": plan.config_id, "rank": comm.rank, "world_size": comm.world_size,
            "batch": plan.config.batch, "device": str(device), "backend": plan.config.backend,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "written": _now()}


def _run_shard(plan: _Plan, comm: _comm.Comm, index: int, on_batch) -> Dict[str, int]:
    """Generate (or finish) shard ``index``; returns {"generated": n, "reused": m}."""
    out, batch = str(plan.config.out), plan.config.batch
    seeds = plan.shards[index]
    parts = batches(seeds, batch)
    xs, ys = [], []
    counts = {"generated": 0, "reused": 0}
    for p, part in enumerate(parts):
        path = store.partial_path(out, index, batch, p)
        arrays = None
        if len(parts) > 1:
            try:
                _, arrays = store.read_checked(path, plan.config_id, part)
            except store.Invalid:
                arrays = None
        if arrays is not None:
            x, y = arrays["samples"], arrays["labels"]
            counts["reused"] += len(part)
        else:
            x, y = sample_seeds(plan, part)
            counts["generated"] += len(part)
            if len(parts) > 1 and p < len(parts) - 1:  # the shard file itself checkpoints its last batch
                store.write_checked(path, {"samples": x, "labels": y, "seeds": np.asarray(part, dtype=np.int64)},
                                    {**_provenance(plan, comm), "shard": index, "part": p,
                                     "seeds": [part[0], part[-1]], "count": len(part)})
        xs.append(x)
        ys.append(y)
        on_batch(len(part))
    x, y = np.concatenate(xs), np.concatenate(ys)
    store.write_checked(store.shard_path(out, index),
                        {"samples": x, "labels": y, "seeds": np.asarray(seeds, dtype=np.int64)},
                        {**_provenance(plan, comm), "shard": index, "seeds": [seeds[0], seeds[-1]],
                         "count": len(seeds)})
    store.remove_quietly(store.partials_of(out, index))
    return counts


def _assemble(plan: _Plan) -> Dict[str, Any]:
    """Rank 0: verify every shard, write ``samples.npz`` (seed order) atomically; returns its manifest entry
    and the shard entries."""
    out = str(plan.config.out)
    n = len(plan.seeds)
    images = labels = None
    shard_entries = []
    pos = 0
    for i, seeds in enumerate(plan.shards):
        path = store.shard_path(out, i)
        try:
            meta, arrays = store.read_checked(path, plan.config_id, seeds)
        except store.Invalid as e:
            raise GenerationError(f"shard {i} ({path}) is not valid after the run ({e}); run the same command "
                                  f"again to redo it") from None
        chunk = plan.spec.to_images(torch.from_numpy(arrays["samples"]))
        chunk = np.asarray(chunk)
        if chunk.dtype != np.uint8 or chunk.ndim != 4 or len(chunk) != len(seeds):
            raise GenerationError(f"model {plan.spec.name}: to_images must return uint8 [N, H, W, C], got "
                                  f"{chunk.dtype} {chunk.shape}")
        if images is None:
            images = np.empty((n,) + chunk.shape[1:], dtype=np.uint8)
            labels = np.empty(n, dtype=np.int64)
        images[pos:pos + len(seeds)] = chunk
        labels[pos:pos + len(seeds)] = arrays["labels"]
        pos += len(seeds)
        shard_entries.append({"index": i, "file": os.path.join(store.SHARDS, os.path.basename(path)),
                              "seeds": [seeds[0], seeds[-1]], "count": len(seeds), "sha256": meta["sha256"],
                              "bytes": meta["bytes"]})
    seeds_arr = np.asarray(plan.seeds, dtype=np.int64)
    path = os.path.join(out, store.SAMPLES)
    store.atomic_write(path, lambda f: store.write_npz(f, {"arr_0": images, "arr_1": labels, "seeds": seeds_arr}))
    return {"samples": {"file": store.SAMPLES, "sha256": store.sha256_file(path), "count": n,
                        "shape": list(images.shape), "dtype": "uint8", "layout": "NHWC"},
            "shards": shard_entries}


def generate(config: GenerateConfig) -> GenerateResult:
    """Generate (or resume) the sample set of ``config`` into ``config.out``; see the module docstring.

    Every argument is checked, and ``--out`` created and probed, before any sampling; problems raise
    ``GenerationError`` naming the argument. Under torchrun every rank calls this and rank 0 returns the
    path of ``samples.npz``.
    """
    plan = _resolve(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    comm = _comm.connect(plan.device, float(config.timeout))
    try:
        return _generate(plan, comm)
    finally:
        comm.close()


def _generate(plan: _Plan, comm: _comm.Comm) -> GenerateResult:
    config = plan.config
    out = str(config.out)
    lead = comm.rank == 0
    say = (lambda msg: print(f"fastguide generate: {msg}", file=sys.stderr, flush=True)) \
        if lead and not config.quiet else (lambda msg: None)

    error = _prepare_dir(plan) if lead else None
    error = comm.broadcast(error)
    if error:
        raise GenerationError(error)
    started = _now()

    # Which shards are done: every rank checks a round-robin share, then all agree on the pending list.
    K = len(plan.shards)
    checked = comm.all_gather(_check_shards(plan, range(comm.rank, K, comm.world_size)))
    status: Dict[int, Optional[str]] = {}
    for part in checked:
        status.update(part)
    pending = sorted(i for i, why in status.items() if why is not None)
    redone = {i: why for i, why in status.items() if why is not None and why != "missing"}
    for i, why in sorted(redone.items()):
        say(f"redoing shard {i} ({store.shard_name(i)}.npz: {why})")
    total = sum(len(plan.shards[i]) for i in pending)
    say(f"{len(plan.seeds)} seeds in {K} shards of {config.shard_size}: {K - len(pending)} done, "
        f"{len(pending)} to do ({total} samples) on {comm.world_size} process"
        f"{'es' if comm.world_size > 1 else ''}, model {config.model}, method {config.method}, "
        f"{plan.sampler} {plan.steps} steps")

    show = config.progress if config.progress is not None else (not config.quiet and sys.stderr.isatty())
    progress = Progress(total, "generate", enabled=bool(total) and bool(show) and lead, unit="sample",
                        show_rate=True)
    comm.start_counters()
    t0, cpu0 = time.perf_counter(), time.process_time()
    mine = assign(pending, comm.rank, comm.world_size)
    counts = {"generated": 0, "reused": 0}

    def on_batch(n: int) -> None:
        done = comm.add("done", n)
        if lead:
            progress.advance_to(done)

    try:
        for index in mine:
            c = _run_shard(plan, comm, index, on_batch)
            counts["generated"] += c["generated"]
            counts["reused"] += c["reused"]
        comm.add("generated", counts["generated"])
        comm.add("reused", counts["reused"])
        comm.add("cpu_ms", round(1000 * (time.process_time() - cpu0)))  # this rank's CPU time sampling
        comm.wait_all_finished(progress.advance_to if lead else (lambda done: None))
    except TimeoutError as e:
        raise GenerationError(str(e)) from None
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    generated = comm.add("generated", 0)
    cpu_seconds = comm.add("cpu_ms", 0) / 1000
    reused = comm.add("reused", 0) + sum(len(plan.shards[i]) for i in range(K) if status[i] is None)
    rate = generated / seconds if seconds > 0 and generated else 0.0
    result = GenerateResult(out, None, len(plan.seeds), K, generated, reused, seconds, rate, comm.rank,
                            comm.world_size, redone)
    if not lead:
        return result

    entries = _assemble(plan)
    manifest_path = os.path.join(out, store.MANIFEST)
    manifest = store.read_json(manifest_path)
    device = plan.device
    manifest["runs"] = list(manifest.get("runs", [])) + [{
        "started": started, "finished": _now(), "world_size": comm.world_size, "batch": config.batch,
        "device": str(device), "backend": config.backend, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "shards_done_before": K - len(pending), "shards_generated": len(pending),
        "shards_redone": {str(i): why for i, why in redone.items()}, "samples_generated": generated,
        "samples_reused": reused, "seconds": round(seconds, 4), "samples_per_s": round(rate, 3),
        "cpu_seconds": round(cpu_seconds, 3)}]
    manifest.update(status="complete", updated=_now(), **entries)
    store.write_json(manifest_path, manifest)
    result.samples_path = os.path.join(out, store.SAMPLES)
    say(f"wrote {result.samples_path}: {len(plan.seeds)} samples ({generated} generated, {reused} reused) in "
        f"{seconds:.1f} s" + (f", {rate:.1f} samples/s" if generated else ""))
    return result
