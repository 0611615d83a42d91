"""``fastguide serve``: ``register(subparsers)`` adds it to a CLI (``fastguide.tools.cli`` does).

  fastguide serve --model digits --port 8000
  curl -s localhost:8000/v1/samples -d '{"label": 3, "seed": 0, "steps": 20, "format": "png"}' > three.png

The server itself is ``fastguide.serve.http`` (Starlette + uvicorn, the ``serve`` extra); this module imports
it only when the command runs, so ``fastguide --help`` works without them.
"""

from __future__ import annotations

import argparse
import sys

SERVE_EPILOG = """\
endpoints:
  GET  /health       200 {"status": "ok"} once warm, 503 {"status": "loading"} before
  POST /v1/samples   a JSON request -> 200 JSON (format raw: base64 float32) or image/png
  GET  /metrics      Prometheus text: requests, queue depth, batch sizes, latency

request: {"label": 3, "seed": 0, "steps": 20, "sampler": "ddim",
          "guidance": [{"type": "cfg", "scale": 2.0}], "format": "raw"}
errors: 400 bad JSON, 422 a bad field (the answer names it), 429 queue full (Retry-After),
500 this request's sampling failed, 503 shutting down.

SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, drain the engine, exit 0.

examples:
  fastguide serve --model digits --port 8000
  fastguide serve --model mypkg.models:imagenet64 --max-batch 32 --host 0.0.0.0
  curl -s localhost:8000/v1/samples -d '{"label": 3, "seed": 0, "steps": 20, "format": "png"}' > 3.png
"""


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def register(subparsers, formatter_class=argparse.RawDescriptionHelpFormatter) -> None:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "serve", help="an HTTP sampling server (continuous batching)",
        description="Serve a model over HTTP: requests are batched step by step (a request joins the running\n"
                    "batch at the next denoising step and leaves it when done), so short and long requests,\n"
                    "guided or not, share the network calls.",
        epilog=SERVE_EPILOG, formatter_class=formatter_class)
    p.add_argument("--model", default="digits", help="'digits' or package.module:factory returning a "
                   "fastguide.generation.ModelSpec (default digits)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                   "every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one, "
                   "printed on stdout)")
    p.add_argument("--max-batch", type=_int_at_least(1), default=8,
                   help="most requests sampled together in one step (default 8)")
    p.add_argument("--max-queue", type=_int_at_least(1), default=256,
                   help="most requests waiting for a batch slot; beyond it requests get 429 (default 256)")
    p.add_argument("--backend", default="auto", help="fused step backend: auto, torch, cpp, triton, cuda "
                   "(default auto)")
    p.add_argument("--policy", default="continuous",
                   help="batching: continuous (requests join and leave the batch at every step; default), "
                        "static (a new batch starts when the last one has finished) or sequential (one at a time)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda[:N]")
    p.add_argument("--max-steps", type=_int_at_least(1), default=None,
                   help="most steps a request may ask for (default: the model's schedule's limit)")
    p.add_argument("--threads", type=_int_at_least(1), default=1,
                   help="torch intra-op threads (default 1: best for small models on shared cores)")
    p.add_argument("--graceful-timeout", type=_seconds, default=None,
                   help="on SIGTERM, seconds to wait for in-flight requests before cancelling them "
                        "(default: wait for all)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info: one access line per request on stdout)")
    p.set_defaults(func=_serve_command)


def _serve_command(args) -> int:
    try:
        from fastguide.serve import http
    except ImportError as e:
        name = getattr(e, "name", None) or str(e)
        print(f"fastguide serve: needs starlette and uvicorn ({name} is missing): pip install 'fastguide[serve]' "
              f"(or pip install starlette uvicorn)", file=sys.stderr)
        return 2
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        print("fastguide serve: needs uvicorn: pip install 'fastguide[serve]' (or pip install uvicorn)",
              file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    try:
        return http.serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch,
                          max_queue=args.max_queue, backend=args.backend, policy=args.policy,
                          device=args.device, max_steps=args.max_steps, log_level=args.log_level,
                          graceful_timeout=args.graceful_timeout)
    except ValueError as e:  # --model, or an engine option the engine refused
        print(f"fastguide serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the address: in use, not ours, not resolvable
        print(f"fastguide serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
