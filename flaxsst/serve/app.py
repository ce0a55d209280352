"""The HTTP front end (Starlette) over one ``Service``: routes, the body limit, and ``Rejected`` as JSON.

Every error is JSON ``{"error": "...", "error_type": "..."}`` naming the problem, and what a client
sent is never a 500. A classification answer also carries ``x-batch-requests`` (the most requests
that shared one of its batches) beside the timing headers (``flaxsst.serve.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from flaxsst.serve import protocol
from flaxsst.serve.metrics import Metrics, TimingMiddleware, milliseconds
from flaxsst.serve.openapi import SWAGGER_PAGE, openapi_schema
from flaxsst.serve.service import TOO_LARGE, Rejected, Service

ROUTES = ("/", "/health", "/ready", "/score", "/predict", "/metrics", "/openapi.json", "/docs")
# A body refused for its size is still read (and dropped) up to this many bytes, so that a client that
# sends all of it before it reads the answer gets the 413 instead of a connection reset.
DRAIN_BYTES = 64 * 1024 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or ``Rejected(TOO_LARGE)`` once it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    refusal = None
    if declared is not None and declared.isdigit() and int(declared) > limit:
        refusal = f"the body is {int(declared)} bytes, more than --max-body-bytes {limit}"
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if refusal is None and size > limit:
            refusal = f"the body is more than --max-body-bytes {limit} bytes"
        if refusal is None:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if refusal is not None:
        raise Rejected(TOO_LARGE, refusal)
    return b"".join(chunks)


def create_app(service: Service, metrics: Metrics, *, draining: Callable[[], bool] = lambda: False,
               stop_timeout_s: float = 60.0) -> Starlette:
    """The app over ``service`` (started by the app's lifespan, stopped after the last answer)."""
    classifier, settings = service.classifier, service.settings
    metrics.watch(service, lambda: service.ready.is_set() and not draining())

    def classification(parse: Callable[[Any], tuple[list[str], Any]], answer: Callable[[Any, Any], Any]):
        """A route: the body -> ``parse`` -> (texts, the request) -> the service -> ``answer(logits, the request)``."""
        async def endpoint(request: Request) -> Response:
            deadline = time.perf_counter() + settings.timeout_s
            try:
                texts, request_ = parse(protocol.read_json(await read_body(request, settings.max_body_bytes)))
                result = await service.classify_async(texts, deadline)
            except Rejected as e:
                status, body, headers = protocol.http_error(e, settings.retry_after_s)
                return JSONResponse(body, status_code=status, headers=headers)
            metrics.queue.observe(result.queue_s)
            return JSONResponse(answer(result.logits, request_), headers={
                "x-tokenization-time": milliseconds(result.tokenization_s), "x-queue-time": milliseconds(result.queue_s),
                "x-inference-time": milliseconds(result.inference_s), "x-batch-requests": str(result.batch_requests)})
        return endpoint

    score = classification(lambda value: (protocol.score_texts(value), None),
                           lambda logits, _: classifier.predictions(logits))
    predict = classification(lambda value: ((parsed := protocol.predict_request(value)).texts, parsed),
                             lambda logits, parsed: protocol.predict_response(logits, classifier.config.id2label, parsed))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        if draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        if not service.ready.is_set():
            return JSONResponse({"status": "warming up", **service.warm_up.describe()}, status_code=503)
        return JSONResponse({"status": "ready", "programs": service.warm_up.total,
                             "warm_up_s": round(service.warm_up.seconds, 3)})

    async def metrics_route(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema(classifier, settings, __doc__.split("\n\n")[0]))

    async def docs(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    async def not_found(request: Request, exc) -> Response:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}; the routes are "
                                      f"{', '.join(ROUTES)}",
                             "error_type": "NotFound" if exc.status_code == 404 else "Method"},
                            status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop, stop_timeout_s)

    routes = [Route("/", health, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/ready", ready, methods=["GET"]), Route("/score", score, methods=["POST"]),
              Route("/predict", predict, methods=["POST"]), Route("/metrics", metrics_route, methods=["GET"]),
              Route("/openapi.json", openapi, methods=["GET"]), Route("/docs", docs, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                     middleware=[Middleware(TimingMiddleware, metrics=metrics, routes=ROUTES)])
