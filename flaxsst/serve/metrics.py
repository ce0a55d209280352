"""The server's Prometheus series and the timing headers every answer carries.

``x-total-time``, ``x-tokenization-time``, ``x-queue-time`` and ``x-inference-time`` (milliseconds, as
text-embeddings-inference names them) are on every answer; a route that did not tokenize or queue
says 0.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flaxsst.serve.service import BatchStats, Service

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The Prometheus series, in a registry of the app's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flaxsst_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.total = Histogram("flaxsst_request_seconds", "Time from the request's arrival to its answer", ["route"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("flaxsst_queue_seconds", "Time a request's texts waited for their first batch",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("flaxsst_inference_seconds", "Model time of one batch", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.batch_texts = Histogram("flaxsst_batch_texts", "Texts in one batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("flaxsst_batch_tokens", "Tokens (unpadded) in one batch",
                                      buckets=tuple(16 * b for b in BATCH_BUCKETS), registry=r)
        self.batch_requests = Histogram("flaxsst_batch_requests", "Requests sharing one batch", buckets=BATCH_BUCKETS,
                                        registry=r)

    def watch(self, service: Service, ready: Callable[[], bool]) -> None:
        """The gauges read from ``service`` at each scrape: its queue, and ``ready()``."""
        r = self.registry
        Gauge("flaxsst_queue_requests", "Requests waiting for a batch", registry=r).set_function(
            lambda: service.queue_depth()[0])
        Gauge("flaxsst_queue_texts", "Texts waiting for a batch", registry=r).set_function(
            lambda: service.queue_depth()[1])
        Gauge("flaxsst_ready", "1 once every program is warm and the server is not draining", registry=r).set_function(
            lambda: float(ready()))
        Gauge("flaxsst_compiles_while_serving", "Programs compiled after the warm-up (a request waited for each)",
              registry=r).set_function(lambda: service.compiles_while_serving)

    def observe_batch(self, stats: BatchStats) -> None:
        self.inference.observe(stats.seconds)
        self.batch_texts.observe(stats.texts)
        self.batch_tokens.observe(stats.tokens)
        self.batch_requests.observe(stats.requests)


class TimingMiddleware:
    """Pure ASGI: the timing headers on every answer, and the request count and latency by route."""

    def __init__(self, app, metrics: Metrics, routes: tuple[str, ...]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = route_of(scope["path"], self.routes)
        status = 500

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name in (b"x-tokenization-time", b"x-queue-time", b"x-inference-time"):
                    if name not in names:
                        headers.append((name, b"0"))
                headers.append((b"x-total-time", milliseconds(time.perf_counter() - started).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.total.labels(route).observe(time.perf_counter() - started)


def route_of(path: str, routes: tuple[str, ...]) -> str:
    """The route ``path`` takes, as its label: ``/v2/models/export/infer`` is ``/v2/models/{name}/infer``;
    a path of no route is ``other`` (the labels stay few whatever clients send)."""
    parts = path.split("/")
    if path.startswith("/v2/models/") and len(parts) > 3:
        parts[3] = "{name}"
    route = "/".join(parts)
    return route if route in routes else "other"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"
