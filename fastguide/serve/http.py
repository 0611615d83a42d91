"""The HTTP front of ``fastguide.serve.Engine``: an ASGI app (``create_app``) and ``serve``, which runs it.

  fastguide serve --model digits --port 8000          (or python -m fastguide serve ...)

Endpoints:

* ``GET /health``: 200 ``{"status": "ok"}`` once the engine has run its warm-up request, before that 503
  ``{"status": "loading"}`` (a readiness probe: route traffic on 200); 503 ``{"status": "error", "error"}``
  if the warm-up raised. Samples sent before the warm-up is done wait for it in the queue.
* ``POST /v1/samples``: a JSON object, the engine's request (label, seed, steps, sampler, guidance, target,
  format, prompt). ``"format": "raw"`` (default) answers 200 JSON ``{"id", "shape", "dtype": "float32",
  "data", "latency_s"}``, ``data`` the base64 of the sample's little-endian C-order float32 bytes
  (``numpy.frombuffer(base64.b64decode(data), "<f4").reshape(shape)``); ``"format": "png"`` answers 200
  ``image/png`` (the model's ``to_images`` conversion; pillow needed), with the id and latency in the
  ``X-Request-Id`` and ``X-Latency-Seconds`` headers.
* ``GET /metrics``: the engine's Prometheus text (``text/plain; version=0.0.4``) plus this server's own
  ``fastguide_http_*`` counters (responses of /v1/samples by status code, client disconnects).

Errors are JSON ``{"error": message, "field": where}`` (``field`` where one field is to blame):

====  ===========================================================================================
400   the body is not JSON, not a JSON object, or not readable (``field`` is ``"body"``)
413   the body is over ``max_body_bytes`` (1 MiB by default)
422   the engine refused the request: a field's value is wrong (``field`` names it, e.g.
      ``"guidance[1].scale"``). 422, not 400: the JSON was fine, what it asks for is not.
429   the engine's bounded queue is full; ``Retry-After`` (whole seconds, at least 1) says when to retry
500   sampling this request failed (a network raised, or the sample was not finite); other requests
      in the same batch are unaffected
503   the server is shutting down: the engine accepts nothing new, or ``graceful_timeout`` ran out
      before this request finished (it was cancelled)
====  ===========================================================================================

Nothing is queued for a refused request: the engine validates the whole request before queueing it. A
client that disconnects while waiting has its request cancelled: the engine frees its batch rows at its
next step, so an abandoned request costs at most one step.

Shutdown: on SIGTERM (or SIGINT) uvicorn stops accepting connections, closes idle keep-alive ones, lets
every request with a connection waiting finish and answer (those running in the batch and those still in
the engine's queue), then runs the lifespan shutdown, which closes the engine with ``drain=True`` and joins
its worker; ``serve`` then returns 0 (uvicorn re-raises the signal after its shutdown; ``serve`` makes that a
no-op so a graceful stop exits 0, not -15). ``graceful_timeout`` bounds the wait: the requests still
unanswered then are cancelled and answered 503.

Why Starlette and uvicorn: the server is a thin layer over the engine (three routes, a lifespan, one
disconnect watch), so it wants a small, real ASGI stack rather than a framework. Starlette is a few
thousand lines with no pydantic (the engine already validates requests and names the bad field, a schema
layer would duplicate it) and gives routing, a lifespan and the ASGI ``http.disconnect`` message that
cancellation hangs on; uvicorn is the standard ASGI server and does the graceful SIGTERM shutdown above
(stop accepting, finish in-flight requests, then lifespan shutdown) that a container orchestrator expects.
Both are pure Python (``pip install 'fastguide[serve]'``); this module is imported only by the serving code,
so ``import fastguide`` does not need them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import logging
import math
import signal
import socket
import sys
import threading
from collections import Counter
from typing import Any, Dict, Optional, Union

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAX_BODY_BYTES = 1 << 20
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLES_PATH = "/v1/samples"
_CLIENT_GONE = 499  # nginx's "client closed request": never sent (nobody is there), only counted

log = logging.getLogger("fastguide.serve")


class _BadBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _ServerState:
    """What the app's routes share: the engine (once built) and the HTTP counters."""

    def __init__(self):
        self.engine = None
        self.responses: Counter = Counter()  # status code -> count, for POST /v1/samples
        self.disconnects = 0
        self.lock = threading.Lock()

    def count(self, status: int) -> None:
        with self.lock:
            self.responses[status] += 1

    def prometheus(self) -> str:
        with self.lock:
            responses, disconnects = sorted(self.responses.items()), self.disconnects
        lines = ["# HELP fastguide_http_sample_responses_total Responses of POST /v1/samples by status code "
                 "(499: the client disconnected first).",
                 "# TYPE fastguide_http_sample_responses_total counter"]
        lines += [f'fastguide_http_sample_responses_total{{code="{code}"}} {n}' for code, n in responses]
        lines += ["# HELP fastguide_http_client_disconnects_total Clients that disconnected while their request "
                  "was waiting or running (the request was cancelled).",
                  "# TYPE fastguide_http_client_disconnects_total counter",
                  f"fastguide_http_client_disconnects_total {disconnects}"]
        return "\n".join(lines) + "\n"


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
           **extra: Any) -> JSONResponse:
    body: Dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, or ``_BadBody`` (400 not JSON / not an object, 413 too large)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _BadBody(413, f"the body is {length} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():  # ClientDisconnect propagates: nobody to answer
        size += len(chunk)
        if size > limit:
            raise _BadBody(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise _BadBody(400, "the body is empty: send a JSON object, e.g. {\"label\": 3, \"seed\": 0, \"steps\": 20}")
    try:
        body = json.loads(raw)  # bytes: UTF-8/16/32 detected; NaN/Infinity accepted, the engine refuses them
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadBody(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _BadBody(400, f"the body must be a JSON object, got a JSON {_json_kind(body)}")
    return body


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(type(value), "value")


async def _until_disconnect(receive) -> None:
    """Returns when the client disconnects (the ASGI ``http.disconnect`` message; the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


_PILLOW: Optional[bool] = None


def _have_pillow() -> bool:
    global _PILLOW
    if _PILLOW is None:
        _PILLOW = importlib.util.find_spec("PIL") is not None
    return _PILLOW


def _png_bytes(engine, sample) -> bytes:
    import io

    from PIL import Image

    if sample.dim() != 3:
        raise ValueError(f"a PNG needs a [C, H, W] sample, this model's samples are {list(sample.shape)}")
    image = engine.to_images(sample.unsqueeze(0))[0]  # uint8 [H, W, C]
    channels = image.shape[-1]
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"a PNG holds 1 to 4 channels, this model's samples have {channels}")
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if channels == 1 else image).save(out, format="PNG")
    return out.getvalue()


def _raw_json(result) -> Dict[str, Any]:
    sample = result.sample.detach().to("cpu", dtype=_float32()).contiguous()
    data = sample.numpy().astype("<f4", copy=False).tobytes(order="C")
    return {"id": result.id, "shape": list(sample.shape), "dtype": "float32",
            "data": base64.b64encode(data).decode("ascii"), "latency_s": result.latency_s}


def _float32():
    import torch

    return torch.float32


def _serve_errors():
    from fastguide.serve import EngineClosed, QueueFull, RequestError, RequestFailed

    return RequestError, QueueFull, EngineClosed, RequestFailed


def build_engine(model: Union[str, Any], *, max_batch: int = 8, max_queue: int = 256, backend: str = "auto",
                 policy: Optional[str] = None, device: Optional[str] = None, max_steps: Optional[int] = None,
                 engine_options: Optional[Dict[str, Any]] = None):
    """``Engine(spec, max_batch=, max_queue=, backend=, ...)``, not started. ``model``: a ``ModelSpec`` or a
    ``--model`` name (``load_model``). ``device``: ``None`` (where the model's parameters are), ``"auto"``
    (CUDA if available, else CPU) or a device; the networks are moved there."""
    import torch

    from fastguide.core.checks import check_device
    from fastguide.generation.models import ModelSpec, load_model
    from fastguide.serve import Engine

    spec = model if isinstance(model, ModelSpec) else load_model(model)
    options = dict(engine_options or {})
    if policy is not None:
        options["policy"] = policy
    if max_steps is not None:
        options["max_steps"] = max_steps
    if device is not None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = check_device("--device", device)
        spec.to(dev)
        options["device"] = dev
    return Engine(spec, max_batch=max_batch, max_queue=max_queue, backend=backend, **options)


def create_app(model: Union[str, Any, None] = None, *, engine: Any = None, max_batch: int = 8,
               max_queue: int = 256, backend: str = "auto", policy: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES, close_timeout: Optional[float] = None,
               engine_options: Optional[Dict[str, Any]] = None) -> Starlette:
    """The ASGI app. ``model``: a ``ModelSpec`` or a ``--model`` name (``digits``, ``pkg.mod:factory``), built
    into an ``Engine(spec, max_batch=, max_queue=, backend=, policy=, **engine_options)`` at startup; or
    ``engine``: an engine not yet started. Startup starts the engine (its warm-up runs in its worker, so the
    server answers ``/health`` 503 until it is done); shutdown closes it with ``drain=True`` (``close_timeout``
    bounds the wait)."""
    if (model is None) == (engine is None):
        raise TypeError("create_app needs a model (a ModelSpec or a model name) or an engine, not both")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    handlers = _Handlers(_ServerState(), max_body_bytes)

    def build():
        return build_engine(model, max_batch=max_batch, max_queue=max_queue, backend=backend, policy=policy,
                            engine_options=engine_options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        eng = engine if engine is not None else await run_in_threadpool(build)
        eng.start()
        handlers.state.engine = eng
        try:
            yield
        finally:
            # uvicorn runs this after the in-flight requests answered: drain whatever is left (requests of
            # clients still connected when a graceful timeout ran out), then join the worker.
            await run_in_threadpool(lambda: eng.close(drain=True, timeout=close_timeout))

    app = Starlette(routes=[Route("/health", handlers.health, methods=["GET"]),
                            Route("/metrics", handlers.metrics, methods=["GET"]),
                            Route(SAMPLES_PATH, handlers.samples, methods=["POST"])],
                    exception_handlers={HTTPException: handlers.http_error}, lifespan=lifespan)
    app.state.server = handlers.state
    return app


class _Handlers:
    """The endpoints, over one server's state (its engine, once started, and the HTTP counters)."""

    def __init__(self, state: "_ServerState", max_body_bytes: int):
        self.state = state
        self.max_body_bytes = max_body_bytes
        self.errors = _serve_errors()  # RequestError, QueueFull, EngineClosed, RequestFailed

    async def health(self, request: Request) -> Response:
        eng = self.state.engine
        if eng is not None and eng.ready:
            return JSONResponse({"status": "ok"})
        error = getattr(eng, "error", None)
        if error is not None:  # the warm-up raised: this server will not become ready
            return JSONResponse({"status": "error", "error": f"{type(error).__name__}: {error}"}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})

    async def metrics(self, request: Request) -> Response:
        eng = self.state.engine
        text = eng.metrics.prometheus() if eng is not None else ""
        if text and not text.endswith("\n"):
            text += "\n"
        return Response(text + self.state.prometheus(), media_type=PROMETHEUS_CONTENT_TYPE)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def samples(self, request: Request) -> Response:
        try:
            response = await self._sample(request)
        except ClientDisconnect:  # gone while sending the body
            self._disconnected()
            response = Response(status_code=_CLIENT_GONE)
        self.state.count(response.status_code)
        return response

    def _disconnected(self) -> None:
        with self.state.lock:
            self.state.disconnects += 1

    async def _sample(self, request: Request) -> Response:
        eng = self.state.engine
        if eng is None:
            return _error(503, "the engine is not running")
        if getattr(eng, "error", None) is not None:
            return _error(503, f"the engine failed to start: {eng.error}")
        try:
            body = await _read_json(request, self.max_body_bytes)
        except _BadBody as e:
            return _error(e.status, str(e), field="body")
        if body.get("format") == "png" and not _have_pillow():
            return _error(422, "format 'png' needs pillow on the server (pip install pillow); use format 'raw'",
                          field="format")
        future = self._submit(eng, body)
        if isinstance(future, Response):
            return future
        return await self._answer(eng, request, future)

    def _submit(self, eng, body):
        """The request's future, or the error response when the engine refuses it."""
        RequestError, QueueFull, EngineClosed, _ = self.errors
        try:
            return eng.submit(body)
        except RequestError as e:
            return _error(422, str(e), field=getattr(e, "field", None))
        except QueueFull as e:
            retry = max(1, math.ceil(float(getattr(e, "retry_after", 1.0) or 1.0)))
            return _error(429, str(e) or "the queue is full", headers={"Retry-After": str(retry)},
                          retry_after=retry)
        except EngineClosed as e:
            return _error(503, str(e) or "the server is shutting down")
        except Exception as e:  # an engine bug, not the client's: say so instead of a bare 500 page
            log.exception("engine.submit failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def _answer(self, eng, request: Request, future) -> Response:
        """Wait for the result while watching for a disconnect (which cancels the request)."""
        waiter = asyncio.wrap_future(future)
        watcher = asyncio.ensure_future(_until_disconnect(request.receive))
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # uvicorn cancels a request's task only when a graceful shutdown's timeout ran out: free the rows
            # and say so (instead of uvicorn's bare 500 and a logged traceback).
            future.cancel()
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            return _error(503, "the server is shutting down: the request was cancelled when the graceful "
                               "shutdown timeout ran out")
        finally:
            watcher.cancel()
        if not waiter.done():  # the client went away: the engine frees the rows at its next step
            future.cancel()
            waiter.cancel()
            self._disconnected()
            return Response(status_code=_CLIENT_GONE)
        if future.cancelled():
            return _error(503, "the request was cancelled by the server")
        return await self._render(eng, future)

    async def _render(self, eng, future) -> Response:
        try:
            result = future.result()
        except self.errors[3] as e:  # RequestFailed
            return _error(500, str(e) or "sampling this request failed")
        except Exception as e:
            log.exception("request failed in the engine")
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        if getattr(result.request, "format", "raw") == "png":
            try:
                png = await run_in_threadpool(_png_bytes, eng, result.sample)
            except Exception as e:
                return _error(500, f"cannot encode the sample as PNG: {e}")
            return Response(png, media_type="image/png",
                            headers={"X-Request-Id": str(result.id), "X-Latency-Seconds": f"{result.latency_s:.6f}"})
        return JSONResponse(_raw_json(result))


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port); port 0 picks a free one (``sock.getsockname()[1]``)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _model_name(engine, model) -> str:
    spec = getattr(engine, "spec", None)
    return getattr(spec, "name", "") or (model if isinstance(model, str) else getattr(model, "name", "") or "?")


def serve(model: Union[str, Any] = "digits", host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_queue: int = 256, backend: str = "auto", policy: Optional[str] = None, *,
          device: Optional[str] = None, max_steps: Optional[int] = None, log_level: str = "info",
          graceful_timeout: Optional[float] = None, announce=print,
          engine_options: Optional[Dict[str, Any]] = None) -> int:
    """Serve ``model`` (a ``ModelSpec`` or a ``--model`` name) over HTTP until SIGTERM/SIGINT; returns 0 after
    a graceful shutdown (in-flight requests answered, the engine drained), 1 if the app failed to start.

    The model is loaded and the engine built before the socket is opened, so a bad name or option fails fast
    (``ValueError``). Once the socket is bound, ``announce`` gets one line with the URL (the real port when
    ``port`` is 0)."""
    import uvicorn

    engine = build_engine(model, max_batch=max_batch, max_queue=max_queue, backend=backend, policy=policy,
                          device=device, max_steps=max_steps, engine_options=engine_options)
    app = create_app(engine=engine, close_timeout=graceful_timeout)
    try:
        sock = _bind(host, port)
    except BaseException:
        with contextlib.suppress(Exception):
            engine.close(drain=False)
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    if announce is not None:
        announce(f"fastguide serve: model {_model_name(engine, model)} on http://{shown}:{bound_port} "
                 f"(max batch {max_batch}, queue {max_queue}); GET /health answers 200 once warm")
        sys.stdout.flush()
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then re-raises the signal under the handler it
    # found, which by default kills the process with it (exit status -15). A quiet handler under uvicorn's
    # makes that re-raise a no-op: a graceful shutdown is a normal exit, status 0.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:  # the lifespan startup failed (uvicorn logged why)
        with contextlib.suppress(Exception):
            engine.close(drain=False)
        return 1
    return 0


__all__ = ["MAX_BODY_BYTES", "PROMETHEUS_CONTENT_TYPE", "build_engine", "create_app", "serve"]
