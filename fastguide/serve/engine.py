"""``Engine``: step-level continuous batching of guided sampling requests.

A worker thread runs iterations (``fastguide.serve.batch.step_batch``): every active request advances one
stage of its own loop, all in one model forward and one fused step, whatever step, sampler and guidance
each is at. A new request joins at the next iteration and a finished one leaves at once, so nobody waits for
a batch to drain (``policy="continuous"``). For comparison, ``"static"`` admits a new batch only when the
previous one has finished (a batch starts together and ends with its longest member) and ``"sequential"``
runs one request at a time.

Faults stay with their request: a bad request is refused by ``submit`` before it is queued
(``RequestError`` naming the field); when a batch raises (the model or a guidance network failed) the
iteration is retried request by request, so only the requests that fail alone fail; a sample with NaN/Inf
fails that request only. A cancelled future (a client that went away) leaves the batch at the next
iteration.

>>> engine = Engine(fastguide.generation.models.digits(), max_batch=16)
>>> engine.start()
>>> fut = engine.submit({"label": 3, "seed": 0, "steps": 25, "guidance": [{"type": "cfg", "scale": 2.0}]})
>>> fut.result().sample.shape          # torch.Size([1, 8, 8])
>>> engine.close()
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Deque, List, Optional

import numpy as np
import torch

from ..backends import dispatch
from ..core.checks import check_int
from ..generation.models import ModelSpec
from ..native.sampling import build_loop
from .batch import Active, BatchContext, TableStack, draw, step_batch
from .metrics import EngineMetrics
from .requests import RequestError, SampleRequest, ServedModel, parse_request, samplers_for

POLICIES = ("continuous", "static", "sequential")
log = logging.getLogger("fastguide.serve")


class QueueFull(RuntimeError):
    """The bounded queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"the queue is full; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


class RequestFailed(RuntimeError):
    """The request was accepted but could not be sampled (a network raised, or the sample is not finite)."""


@dataclass
class SampleResult:
    """A finished request: its sample (float32, CPU, the model's sample shape) and how long it took."""

    sample: torch.Tensor
    request: SampleRequest
    latency_s: float
    id: int


@dataclass
class _Job:
    active: Active
    future: Future
    submitted: float
    id: int


def _served_model(spec: ModelSpec, max_steps: Optional[int]) -> ServedModel:
    kinds = spec.network_kinds or {}
    networks = {name: (kinds.get(name, "any"), net) for name, net in spec.networks.items()
                if net is not spec.model and kinds.get(name) != "model"}
    limit = spec.schedule.num_train_timesteps if spec.schedule.kind == "vp" else 1000
    if max_steps is not None:
        limit = min(limit, check_int("max_steps", max_steps, minimum=1))
    null = spec.null_label
    return ServedModel(num_classes=spec.num_classes if spec.encode_prompt is None else None, null_label=null,
                       samplers=samplers_for(spec.schedule), default_sampler=spec.sampler,
                       default_steps=min(spec.steps, limit), max_steps=limit, networks=networks,
                       prompt=spec.encode_prompt is not None)


class Engine:
    """Serve ``spec`` (a ``fastguide.generation.ModelSpec``) with step-level continuous batching.

    Args:
        spec: the model, its schedule, sample shape, classes / null label or prompt encoder, guidance
            networks (``spec.networks``, typed by ``spec.network_kinds``), clip and default sampler / steps.
        max_batch: int >= 1, default 8: the most requests in one iteration (the model batch has at most
            twice as many rows).
        max_queue: int >= 1, default 256: the most requests waiting to join; ``submit`` raises ``QueueFull``
            beyond it.
        backend: the fused step's backend (``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``).
        policy: ``"continuous"`` (default), ``"static"`` or ``"sequential"`` (see the module docstring).
        device: where the state and the networks live; default the model's parameters' device (or CPU).
        max_steps: optional int, the most steps a request may ask for (default the schedule's limit).
    """

    def __init__(self, spec: ModelSpec, *, max_batch: int = 8, max_queue: int = 256, backend: str = "auto",
                 policy: str = "continuous", device=None, max_steps: Optional[int] = None):
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a fastguide.generation.ModelSpec, got {type(spec).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.max_batch = check_int("max_batch", max_batch, minimum=1)
        self.max_queue = check_int("max_queue", max_queue, minimum=1)
        self.policy = policy
        self.spec = spec
        self.device = torch.device(device) if device is not None else _model_device(spec)
        dispatch.resolve(backend, self.device)
        self.backend = backend
        self.served = _served_model(spec, max_steps)
        learned = spec.schedule.kind == "vp" and spec.schedule.variance_type == "learned_range"
        self.ctx = BatchContext(model=spec.model, null_condition=spec.null_label, clip=spec.clip, backend=backend,
                                tables=TableStack(self.device), learned_model=learned)
        self.metrics = EngineMetrics(self.max_batch)
        self._queue: Deque[_Job] = collections.deque()
        self._active: List[_Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count(1)
        self.ready = False
        self.error: Optional[BaseException] = None

    # ------------------------------------------------------------------------------------- client side

    def submit(self, body) -> Future:
        """Check a request (a JSON object or a ``SampleRequest``) and queue it; returns its ``Future``
        (``.result()`` is a ``SampleResult``; ``.cancel()`` frees its rows at the next iteration)."""
        try:
            request = parse_request(body, self.served)
            active = self._activate(request)
        except RequestError:
            self.metrics.count("invalid")
            raise
        with self._cond:
            if self.error is not None:
                raise EngineClosed(f"the engine failed to start: {self.error}")
            if self._closing:
                self.metrics.count("rejected_closed")
                raise EngineClosed("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                self.metrics.count("rejected_full")
                raise QueueFull(self._retry_after())
            job = _Job(active, Future(), time.perf_counter(), next(self._ids))
            self._queue.append(job)
            self.metrics.gauges(len(self._queue), len(self._active))
            self._cond.notify_all()
        return job.future

    async def generate(self, body) -> SampleResult:
        """``submit`` and await the result; cancelling the awaiting task cancels the request."""
        future = self.submit(body)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def to_images(self, samples: torch.Tensor) -> np.ndarray:
        """Float samples ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (the model spec's conversion)."""
        return self.spec.to_images(samples)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_count(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------------------------- lifecycle

    def start(self) -> "Engine":
        """Start the worker thread (it warms the model up first; ``ready`` turns True after)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastguide-engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and self.error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        if self.error is not None:
            raise RuntimeError(f"the engine failed to start: {self.error}") from self.error
        return True

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting requests; with ``drain`` finish the queued and in-flight ones, else fail them
        with ``EngineClosed``; then stop the worker thread."""
        with self._cond:
            self._closing = True
            if not drain:
                for job in list(self._queue) + self._active:
                    _set_exception(job.future, EngineClosed("the engine was closed"))
                self._queue.clear()
                self._active.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- worker side

    def _activate(self, request: SampleRequest) -> Active:
        """The request's loop (what ``fastguide.sample`` would run for it alone), generator and x_T."""
        try:
            gp, spec = build_loop(request.sampler, self.spec.schedule, request.steps, request.guidance, 1,
                                  self.spec.clip)
        except (ValueError, TypeError) as e:
            raise RequestError("steps" if "steps" in str(e) else "sampler", str(e)) from None
        generator = torch.Generator().manual_seed(request.seed)
        shape = (1,) + tuple(self.spec.sample_shape)
        x_T = torch.randn(shape, generator=generator).to(self.device)
        if request.prompt is not None:
            y = self.spec.encode_prompt(request.prompt).to(self.device).unsqueeze(0)
        else:
            y = torch.tensor([request.label if request.label is not None else self.spec.null_label],
                             device=self.device) if self.served.num_classes is not None else None
        label = request.class_label
        y_guide = torch.tensor([label], device=self.device) if label is not None else None
        return Active(request=request, classifiers=tuple(gp.classifiers), discriminators=tuple(gp.discriminators),
                      spec=spec, table_key=spec.rows.tobytes(), generator=generator, x=x_T * spec.init_scale,
                      y=y, y_guide=y_guide)

    def _retry_after(self) -> float:
        lat = self.metrics.latency
        return max(1.0, lat.total / lat.count) if lat.count else 1.0

    def _run(self) -> None:
        try:
            self._warm_up()
        except BaseException as e:  # reported by wait_ready / the HTTP health check
            self.error = e
            log.exception("engine warm-up failed")
            return
        self.ready = True
        while True:
            with self._cond:
                self._admit()
                if not self._active:
                    if self._closing and not self._queue:
                        return
                    self._cond.wait(0.05)
                    continue
                jobs = list(self._active)
            try:
                self._iterate(jobs)
            except Exception as e:  # a bug in the engine itself: fail this batch, keep serving
                log.exception("engine iteration failed")
                for job in jobs:
                    self._fail(job, RequestFailed(f"engine error: {e}"))

    def _warm_up(self) -> None:
        body = {"seed": 0, "steps": 1}
        if self.served.prompt:
            body["prompt"] = ""
        elif self.served.num_classes is not None:
            body["label"] = 0
        active = self._activate(parse_request(body, self.served))
        with torch.no_grad():
            while not active.done:
                result = step_batch([active], [draw(active)], self.ctx)
                active.x, active.stage = result.x, active.stage + 1

    def _admit(self) -> None:
        """Move queued requests into the batch, as the policy allows (call with the lock held)."""
        if self.policy == "continuous":
            room = self.max_batch - len(self._active)
        elif self._active:
            room = 0
        else:
            room = 1 if self.policy == "sequential" else self.max_batch
        while room > 0 and self._queue:
            job = self._queue.popleft()
            if job.future.cancelled():
                self.metrics.count("cancelled")
                continue
            self._active.append(job)
            room -= 1
        self.metrics.gauges(len(self._queue), len(self._active))

    def _iterate(self, jobs: List[_Job]) -> None:
        live = []
        for job in jobs:
            if job.future.cancelled():
                self._retire(job)
                self.metrics.count("cancelled")
            else:
                live.append(job)
        if not live:
            return
        batch = [job.active for job in live]
        draws = [draw(a) for a in batch]
        with torch.no_grad():
            try:
                result = step_batch(batch, draws, self.ctx)
                outcomes = [(job, result.x[i:i + 1], None if result.x0 is None else result.x0[i:i + 1])
                            for i, job in enumerate(live)]
                self.metrics.iteration(len(batch), result.model_rows, result.uncond_rows)
            except Exception as batch_error:
                outcomes = self._isolate(live, draws, batch_error)
        for job, x, x0 in outcomes:
            a = job.active
            a.x0_prev = x0 if a.kind.writes_x0 else None
            a.x, a.stage = x, a.stage + 1
            if a.done:
                self._finish(job)

    def _isolate(self, live: List[_Job], draws, batch_error: Exception) -> list:
        """After a failed batch, each request's stage alone (the same noise): only the culprits fail."""
        if len(live) == 1:
            self._fail(live[0], RequestFailed(f"{type(batch_error).__name__}: {batch_error}"))
            return []
        outcomes = []
        for job, d in zip(live, draws):
            try:
                r = step_batch([job.active], [d], self.ctx)
            except Exception as e:
                self._fail(job, RequestFailed(f"{type(e).__name__}: {e}"))
                continue
            self.metrics.iteration(1, r.model_rows, r.uncond_rows)
            outcomes.append((job, r.x, r.x0))
        return outcomes

    def _retire(self, job: _Job) -> None:
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            self.metrics.gauges(len(self._queue), len(self._active))

    def _finish(self, job: _Job) -> None:
        self._retire(job)
        sample = job.active.x[0].detach().float().cpu()
        if not bool(torch.isfinite(sample).all()):
            self._fail(job, RequestFailed("the sample holds NaN or Inf (the model or guidance diverged)"), retire=False)
            return
        latency = time.perf_counter() - job.submitted
        result = SampleResult(sample=sample, request=job.active.request, latency_s=latency, id=job.id)
        try:
            job.future.set_result(result)
            self.metrics.count("ok", latency)
        except InvalidStateError:  # cancelled meanwhile
            self.metrics.count("cancelled")

    def _fail(self, job: _Job, error: Exception, retire: bool = True) -> None:
        if retire:
            self._retire(job)
        if _set_exception(job.future, error):
            self.metrics.count("failed", time.perf_counter() - job.submitted)


def _set_exception(future: Future, error: Exception) -> bool:
    try:
        future.set_exception(error)
        return True
    except InvalidStateError:
        return False


def _model_device(spec: ModelSpec) -> torch.device:
    for net in spec.networks.values():
        for p in net.parameters():
            return p.device
    return torch.device("cpu")
