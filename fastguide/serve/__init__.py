"""Serving: an engine that batches guided sampling requests at different steps (``Engine``), and its HTTP
server (``fastguide serve``, ``fastguide.serve.http``)."""

from .engine import Engine, EngineClosed, QueueFull, RequestFailed, SampleResult
from .requests import RequestError, SampleRequest, parse_request

__all__ = ["Engine", "EngineClosed", "QueueFull", "RequestError", "RequestFailed", "SampleRequest",
           "SampleResult", "parse_request"]
