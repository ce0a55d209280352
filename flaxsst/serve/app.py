"""The HTTP app (Starlette): routes, limits, metrics and timing headers over one ``Batcher``.

Every answer carries ``x-total-time``, ``x-tokenization-time``, ``x-queue-time`` and
``x-inference-time`` (milliseconds, as text-embeddings-inference names them), and a classification
``x-batch-requests`` (the most requests that shared one of its batches); every error is JSON
``{"error": "...", "error_type": "..."}`` naming the problem, and what a client sent is never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flaxsst.serve import protocol
from flaxsst.serve.batcher import Batcher, BatchStats, QueueFull, Stopped

ROUTES = ("/", "/health", "/ready", "/score", "/predict", "/metrics", "/openapi.json", "/docs")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold, and how long it may wait."""

    max_body_bytes: int
    max_texts: int
    timeout_s: float
    retry_after_s: int = 1


class Metrics:
    """The Prometheus series, in a registry of the app's own."""

    def __init__(self, batcher: Batcher, ready: Callable[[], bool]):
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
        Gauge("flaxsst_queue_requests", "Requests waiting for a batch", registry=r).set_function(
            lambda: batcher.queue_depth()[0])
        Gauge("flaxsst_queue_texts", "Texts waiting for a batch", registry=r).set_function(
            lambda: batcher.queue_depth()[1])
        Gauge("flaxsst_ready", "1 once every program is warm and the server is not draining", registry=r).set_function(
            lambda: float(ready()))

    def observe_batch(self, stats: BatchStats) -> None:
        self.inference.observe(stats.seconds)
        self.batch_texts.observe(stats.texts)
        self.batch_tokens.observe(stats.tokens)
        self.batch_requests.observe(stats.requests)


class TimingMiddleware:
    """Pure ASGI: the timing headers on every answer, and the request count and latency by route."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
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


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.ClientError(413, f"the body is {int(declared)} bytes, more than --max-body-bytes {limit}",
                                   "Payload")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.ClientError(413, f"the body is more than --max-body-bytes {limit} bytes", "Payload")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(classifier, batcher: Batcher, limits: Limits, *, draining: Callable[[], bool] = lambda: False,
               stop_timeout_s: float = 60.0) -> Starlette:
    """The app over ``batcher`` (started by the app's lifespan, stopped after the last answer)."""
    metrics = Metrics(batcher, lambda: batcher.ready.is_set() and not draining())
    batcher.on_batch = metrics.observe_batch
    id2label = classifier.config.id2label

    async def classify(request: Request, parse: Callable[[Any], list[str]]):
        """Body -> texts -> the batcher -> (logits, timing headers); raises ClientError for the client's mistakes."""
        arrived = time.perf_counter()
        body = await read_body(request, limits.max_body_bytes)
        texts = parse(protocol.read_json(body))
        if len(texts) > limits.max_texts:
            raise protocol.ClientError(413, f"{len(texts)} texts, more than --max-texts {limits.max_texts}", "Payload")
        tokenized = time.perf_counter()
        try:
            ids = classifier.encode(texts)
        except (TypeError, ValueError) as e:
            raise protocol.ClientError(422, str(e)) from None
        tokenization_s = time.perf_counter() - tokenized
        try:
            future = batcher.submit(ids)
        except QueueFull as e:
            raise protocol.ClientError(429, f"overloaded: {e}; retry after {limits.retry_after_s} s",
                                       "Overloaded") from None
        except Stopped as e:
            raise protocol.ClientError(503, str(e), "Unhealthy") from None
        remaining = limits.timeout_s - (time.perf_counter() - arrived)
        try:
            job = await asyncio.wait_for(asyncio.wrap_future(future), max(remaining, 0.0))
        except asyncio.TimeoutError:  # wait_for cancels the future: texts not yet in a batch are dropped
            raise protocol.ClientError(504, f"not answered within --timeout-ms {limits.timeout_s * 1e3:.0f}",
                                       "Timeout") from None
        metrics.queue.observe(job.queue_s)
        headers = {"x-tokenization-time": milliseconds(tokenization_s), "x-queue-time": milliseconds(job.queue_s),
                   "x-inference-time": milliseconds(job.inference_s), "x-batch-requests": str(job.batch_requests)}
        return job.logits, headers

    def answering(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except protocol.ClientError as e:
                headers = {"Retry-After": str(limits.retry_after_s)} if e.status == 429 else None
                return error_response(e.status, str(e), e.error_type, headers)
        return endpoint

    @answering
    async def score(request: Request) -> Response:
        logits, headers = await classify(request, protocol.score_texts)
        return JSONResponse(classifier.predictions(logits), headers=headers)

    @answering
    async def predict(request: Request) -> Response:
        parsed = None

        def parse(value):
            nonlocal parsed
            parsed = protocol.predict_request(value)
            return parsed.texts

        logits, headers = await classify(request, parse)
        return JSONResponse(protocol.predict_response(logits, id2label, parsed), headers=headers)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        if draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        if not batcher.ready.is_set():
            return JSONResponse({"status": "warming up", "programs": len(classifier.program_shapes())},
                                status_code=503)
        return JSONResponse({"status": "ready", "programs": batcher.programs, "warm_up_s": batcher.warm_up_s})

    async def metrics_route(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema(classifier, limits))

    async def docs(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    async def not_found(request: Request, exc) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; the routes are "
                              f"{', '.join(ROUTES)}", "NotFound" if exc.status_code == 404 else "Method")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop, stop_timeout_s)

    routes = [
        Route("/", health, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/score", score, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                     middleware=[Middleware(TimingMiddleware, metrics=metrics)])


SWAGGER_PAGE = """<!doctype html>
<html><head><title>flaxsst.serve</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The schema is at <a href="/openapi.json">/openapi.json</a>.</noscript></body></html>
"""


def openapi_schema(classifier, limits: Limits) -> dict:
    """OpenAPI 3.1 for the routes, with the card's sample request and this model's labels."""
    labels = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
    prediction = {"type": "object", "properties": {"label": {"type": "string", "enum": labels},
                                                   "score": {"type": "number"}}, "required": ["label", "score"]}
    error = {"type": "object", "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
    texts = {"type": "array", "items": {"type": "string"}, "maxItems": limits.max_texts}
    errors = {str(code): {"description": why, "content": {"application/json": {"schema": error}}} for code, why in (
        (400, "not UTF-8 or not JSON"), (413, "body over --max-body-bytes or more than --max-texts texts"),
        (422, "a wrong shape or a text that is not a string (names the key or index)"),
        (429, "the queue is full (--max-queue): retry after Retry-After seconds"), (503, "shutting down"),
        (504, "not answered within --timeout-ms"))}

    def answer(schema):
        return {"200": {"description": "one answer per text, in order", "content": {"application/json": {"schema": schema}}},
                **errors}

    def status(description):
        return {"200": {"description": description}, "503": {"description": "not ready"}}

    sample = ["Today was an amazing day!", "It was an unfortunate series of events."]
    return {
        "openapi": "3.1.0",
        "info": {"title": "flaxsst.serve", "version": "1", "description": __doc__.split("\n\n")[0]},
        "paths": {
            "/score": {"post": {
                "summary": "The model card's endpoint: the best label and its score per text",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"oneOf": [{"type": "object", "properties": {"input_data": texts},
                                          "required": ["input_data"]}, texts]},
                    "example": {"input_data": sample}}}},
                "responses": answer({"type": "array", "items": prediction})}},
            "/predict": {"post": {
                "summary": "text-embeddings-inference's classification: every label, highest score first",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["inputs"], "properties": {
                        "inputs": {"oneOf": [{"type": "string"}, {"type": "array"}]},
                        "raw_scores": {"type": "boolean", "default": False},
                        "truncate": {"type": "boolean", "default": False,
                                     "description": f"texts are cut to {classifier.max_length} tokens either way"}}},
                    "example": {"inputs": sample[0]}}}},
                "responses": answer({"oneOf": [{"type": "array", "items": prediction},
                                               {"type": "array", "items": {"type": "array", "items": prediction}}]})}},
            "/health": {"get": {"summary": "alive", "responses": {"200": {"description": "alive"}}}},
            "/": {"get": {"summary": "alive (Azure ML's liveness route)", "responses": {"200": {"description": "alive"}}}},
            "/ready": {"get": {"summary": "200 once every program is compiled and warm; 503 before, and while draining",
                               "responses": status("ready")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
        },
    }
