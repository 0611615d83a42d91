"""The engine's counters, in Prometheus' text exposition format (``GET /metrics``).

>>> print(engine.metrics.prometheus())      # fastguide_requests_total{outcome="ok"} 12 ...
"""

from __future__ import annotations

import bisect
import threading
from typing import Dict, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("ok", "failed", "cancelled", "invalid", "rejected_full", "rejected_closed")


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list:
        out, running = [], 0
        for bound, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6g}", f"{name}_count {self.count}"]
        return out


class EngineMetrics:
    """Thread-safe counters of one engine; ``prometheus()`` renders them."""

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self.requests: Dict[str, int] = {k: 0 for k in OUTCOMES}
        self.queue_depth = 0
        self.active = 0
        self.iterations = 0
        self.model_rows = 0
        self.uncond_rows_skipped = 0
        self.batch_size = Histogram([b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_batch] + [max_batch])
        self.latency = Histogram(LATENCY_BUCKETS)

    def count(self, outcome: str, latency_s: float = None) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if latency_s is not None:
                self.latency.observe(latency_s)

    def iteration(self, batch: int, model_rows: int, uncond_rows: int) -> None:
        """One engine iteration: ``batch`` requests, a model forward of ``model_rows`` rows of which
        ``uncond_rows`` uncond; every request without an uncond row is a row dense CFG batching would run."""
        with self._lock:
            self.iterations += 1
            self.model_rows += model_rows
            self.uncond_rows_skipped += batch - uncond_rows
            self.batch_size.observe(batch)

    def gauges(self, queue_depth: int, active: int) -> None:
        with self._lock:
            self.queue_depth, self.active = queue_depth, active

    def prometheus(self) -> str:
        with self._lock:
            lines = ["# HELP fastguide_requests_total Requests by outcome.", "# TYPE fastguide_requests_total counter"]
            lines += [f'fastguide_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            for name, kind, value, text in (
                    ("fastguide_queue_depth", "gauge", self.queue_depth, "Requests waiting to join the batch."),
                    ("fastguide_active_requests", "gauge", self.active, "Requests in the running batch."),
                    ("fastguide_iterations_total", "counter", self.iterations, "Engine iterations (one fused step each)."),
                    ("fastguide_model_rows_total", "counter", self.model_rows, "Rows of model forwards."),
                    ("fastguide_uncond_rows_skipped_total", "counter", self.uncond_rows_skipped,
                     "Uncond rows not computed: requests needing no CFG pass at that iteration (sparse CFG).")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            lines += ["# HELP fastguide_batch_size Requests per iteration.", "# TYPE fastguide_batch_size histogram"]
            lines += self.batch_size.lines("fastguide_batch_size")
            lines += ["# HELP fastguide_request_latency_seconds Submit to answer.",
                      "# TYPE fastguide_request_latency_seconds histogram"]
            lines += self.latency.lines("fastguide_request_latency_seconds")
        return "\n".join(lines) + "\n"
