"""Progress on stderr, shared by the long commands (demo, bench, train-digits, generate): a tqdm bar when
stderr is a terminal, nothing otherwise or with ``--quiet``; results always go to stdout."""

from __future__ import annotations

import os
import sys
from typing import Optional

QUIET_HELP = "show no progress on stderr (it is shown only when stderr is a terminal)"


def progress_enabled(quiet: bool = False) -> bool:
    """Whether a command shows progress: not with ``--quiet``, and only when stderr is a terminal (so logs,
    pipes and captured output get none)."""
    stream = sys.stderr
    return not quiet and stream is not None and hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """Stage-by-stage progress on stderr: a tqdm bar when tqdm is importable, else one line per stage, flushed
    as the stage starts; nothing at all when ``enabled`` is false. Results never go here: they go to stdout.

    >>> with Progress(total=3, desc="fastguide demo", enabled=progress_enabled()) as progress:
    ...     for name in ("a", "b", "c"):
    ...         progress.stage(name)      # what runs now
    ...         work(name)
    ...         progress.advance()        # one stage done
    """

    def __init__(self, total: Optional[int], desc: str, enabled: bool = True, unit: str = "it",
                 show_rate: bool = False):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: a line per stage instead
                tqdm = None
            if tqdm is not None:
                try:  # a terminal that reports no size (some CI ttys) would get no bar at all from tqdm
                    size = os.get_terminal_size(sys.stderr.fileno())
                    sized = size.columns > 0 and size.lines > 0
                except (AttributeError, OSError, ValueError):
                    sized = False
                rate = ", {rate_fmt}" if show_rate else ""
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=sized,
                                 unit=unit, bar_format="{desc}: {percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} "
                                                       "[{elapsed}" + rate + "{postfix}]",
                                 **({} if sized else {"ncols": 100, "nrows": 24}))

    def set_total(self, total: int) -> None:
        """The number of stages, once it is known."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def stage(self, text: str) -> None:
        """Show what runs now."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        else:
            total = "?" if self.total is None else self.total
            print(f"{self.desc} [{self.done}/{total}] {text}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        """``n`` more stages done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def advance_to(self, done: int) -> None:
        """``done`` stages (or items) done in all (a count read from elsewhere, e.g. other ranks)."""
        if self.total is not None:
            done = min(done, self.total)
        if done > self.done:
            self.advance(done - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stderr_log(enabled: bool):
    """A ``log(line)`` callable for library functions that report progress by lines: each line to stderr,
    flushed, when ``enabled``; else ``None`` (their "say nothing")."""
    if not enabled:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)
