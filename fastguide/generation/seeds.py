"""Seed specs (``"0-49999"``, ``"0-9,20,30-31"``) and the seed -> shard layout.

A seed spec is a comma list of non-negative integers and inclusive ranges ``a-b`` (``a <= b``); seeds may
not repeat. The set is kept sorted: samples are always stored in seed order, whatever order the spec lists.

Shards are fixed-size chunks of the sorted seed list (``shard_size`` seeds each, the last one shorter), so
which shard a seed belongs to depends on the seed set and the shard size only — not on the world size, the
batch size or the machine — and a run can be resumed with any number of processes.

>>> seeds = parse_seeds("0-9,20,30-31")
>>> format_seeds(seeds)
'0-9,20,30-31'
>>> shard_seeds(seeds, 4)[0]
[0, 1, 2, 3]
"""

from __future__ import annotations

import numbers
import re
from typing import Iterable, List, Sequence, Union

MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; the files store int64
MAX_SEEDS = 100_000_000  # a typo like 0-99999999999 would otherwise allocate forever

_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class SeedSpecError(ValueError):
    """A seed spec that cannot be used (negative, duplicated, malformed, empty)."""


def parse_seeds(spec: Union[str, int, Iterable[int]], name: str = "--seeds") -> List[int]:
    """The sorted list of seeds of ``spec``: a string like ``"0-9,20,30-31"``, one int, or ints.

    Raises ``SeedSpecError`` naming ``name`` and the offending part for negative seeds, reversed ranges,
    duplicates, non-integers and empty specs.
    """
    if isinstance(spec, bool):
        raise SeedSpecError(f"{name} must be a seed spec like '0-49999' or '0-9,20', got {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        seeds: List[int] = []
        if not spec.strip():
            raise SeedSpecError(f"{name} is empty: give seeds like '0-49999' or '0-9,20,30-31'")
        for part in spec.split(","):
            m = _PART.match(part)
            if m is None:
                hint = " (seeds must be >= 0)" if part.strip().startswith("-") else ""
                raise SeedSpecError(f"{name}: cannot read {part.strip()!r} in {spec!r}{hint}; use non-negative "
                                    f"integers and ranges a-b, comma separated, e.g. '0-9,20,30-31'")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise SeedSpecError(f"{name}: range {part.strip()!r} runs backwards ({lo} > {hi})")
            if hi > MAX_SEED:
                raise SeedSpecError(f"{name}: seed {hi} is larger than {MAX_SEED} (int64)")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise SeedSpecError(f"{name}: more than {MAX_SEEDS} seeds in {spec!r}")
            seeds.extend(range(lo, hi + 1))
    else:
        try:
            seeds = list(spec)
        except TypeError:
            raise SeedSpecError(f"{name} must be a seed spec string or a list of ints, got "
                                f"{type(spec).__name__}") from None
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise SeedSpecError(f"{name}: seeds must be integers, got {s!r}")
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise SeedSpecError(f"{name} is empty: give at least one seed")
        bad = [s for s in seeds if s < 0 or s > MAX_SEED]
        if bad:
            raise SeedSpecError(f"{name}: seeds must be in 0..{MAX_SEED}, got {bad[0]}")
    ordered = sorted(seeds)
    dups = [b for a, b in zip(ordered, ordered[1:]) if a == b]
    if dups:
        shown = sorted(set(dups))
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise SeedSpecError(f"{name}: seed{'s' if len(shown) > 1 else ''} "
                            f"{', '.join(map(str, shown[:5]))}{more} listed more than once")
    return ordered


def format_seeds(seeds: Sequence[int]) -> str:
    """The canonical spec of a sorted, duplicate-free seed list: maximal ranges, comma separated."""
    parts = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def num_shards(num_seeds: int, shard_size: int) -> int:
    return (num_seeds + shard_size - 1) // shard_size


def shard_seeds(seeds: Sequence[int], shard_size: int) -> List[List[int]]:
    """The seeds of every shard: consecutive ``shard_size`` chunks of the sorted seed list."""
    return [list(seeds[i:i + shard_size]) for i in range(0, len(seeds), shard_size)]


def batches(shard: Sequence[int], batch: int) -> List[List[int]]:
    """The batches of a shard: consecutive ``batch`` chunks of its seeds (never spanning two shards, so a
    batch's composition does not depend on the world size)."""
    return [list(shard[i:i + batch]) for i in range(0, len(shard), batch)]


def assign(pending: Sequence[int], rank: int, world_size: int) -> List[int]:
    """The shards ``rank`` generates: the pending shard indices, sorted, dealt round-robin."""
    return sorted(pending)[rank::world_size]
