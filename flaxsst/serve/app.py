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

from flaxsst.serve import oip, protocol
from flaxsst.serve.metrics import Metrics, TimingMiddleware, milliseconds
from flaxsst.serve.openapi import SWAGGER_PAGE, openapi_schema
from flaxsst.serve.service import TOO_LARGE, UNKNOWN_MODEL, Rejected, Service

ROUTES = ("/", "/health", "/ready", "/score", "/predict", "/metrics", "/openapi.json", "/docs", "/v2",
          "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
          "/v2/models/{name}/infer")
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


class CloseWhenDraining:
    """Pure ASGI: while draining, every answer carries ``Connection: close``, so the server closes each
    connection after its answer and none that carries a request is cut when the listener closes."""

    def __init__(self, app, draining: Callable[[], bool]):
        self.app = app
        self.draining = draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_closing(message):
            if message["type"] == "http.response.start" and self.draining():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def create_app(service: Service, metrics: Metrics, *, draining: Callable[[], bool] = lambda: False,
               stop_timeout_s: float = 60.0, model_name: str = "model") -> Starlette:
    """The app over ``service`` (started by the app's lifespan, stopped after the last answer);
    ``model_name`` is the model's name in the Open Inference Protocol's paths."""
    classifier, settings = service.classifier, service.settings
    id2label = classifier.config.id2label

    def serving() -> bool:
        return service.ready.is_set() and not draining()

    def refused(error: Rejected) -> Response:
        status, body, headers = protocol.http_error(error, settings.retry_after_s)
        return JSONResponse(body, status_code=status, headers=headers)

    metrics.watch(service, serving)

    def classification(parse: Callable[[Request, bytes], tuple[list[str], Any]],
                       answer: Callable[[Any, Any], Response]):
        """A route: the body -> ``parse`` -> (texts, the request) -> the service -> ``answer(logits, the request)``."""
        async def endpoint(request: Request) -> Response:
            deadline = time.perf_counter() + settings.timeout_s
            try:
                texts, request_ = parse(request, await read_body(request, settings.max_body_bytes))
                result = await service.classify_async(texts, deadline)
            except Rejected as e:
                return refused(e)
            metrics.queue.observe(result.queue_s)
            response = answer(result.logits, request_)
            response.headers.update({
                "x-tokenization-time": milliseconds(result.tokenization_s), "x-queue-time": milliseconds(result.queue_s),
                "x-inference-time": milliseconds(result.inference_s), "x-batch-requests": str(result.batch_requests)})
            return response
        return endpoint

    def json_body(read: Callable[[Any], tuple[list[str], Any]]) -> Callable[[Request, bytes], tuple[list[str], Any]]:
        return lambda request, body: read(protocol.read_json(body))

    def this_model(request: Request) -> None:
        if request.path_params["name"] != model_name:
            raise Rejected(UNKNOWN_MODEL, f"no model {request.path_params['name']!r} here; this server serves "
                                          f"{model_name!r} (--model-name)")

    def infer_request(request: Request, body: bytes) -> tuple[list[str], oip.InferRequest]:
        this_model(request)
        parsed = oip.read_infer_request(body, request.headers.get(oip.HEADER_LENGTH))
        return parsed.texts, parsed

    def infer_answer(logits, parsed: oip.InferRequest) -> Response:
        body, headers = oip.infer_response(logits, id2label, model_name, parsed)
        return Response(body, headers=headers)

    score = classification(json_body(lambda value: (protocol.score_texts(value), None)),
                           lambda logits, _: JSONResponse(classifier.predictions(logits)))
    predict = classification(json_body(lambda value: ((parsed := protocol.predict_request(value)).texts, parsed)),
                             lambda logits, parsed: JSONResponse(protocol.predict_response(logits, id2label, parsed)))
    infer = classification(infer_request, infer_answer)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        if draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        if not service.ready.is_set():
            return JSONResponse({"status": "warming up", **service.warm_up.describe()}, status_code=503)
        return JSONResponse({"status": "ready", "programs": service.warm_up.total,
                             "warm_up_s": round(service.warm_up.seconds, 3)})

    def v2_readiness(body: dict[str, Any]) -> Response:  # the protocol's "false" is a 4xx
        ready_now = serving()
        return JSONResponse({**body, "ready": ready_now}, status_code=200 if ready_now else 400)

    async def v2_server(request: Request) -> Response:
        return JSONResponse(oip.server_metadata())

    async def v2_live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def v2_server_ready(request: Request) -> Response:
        return v2_readiness({})

    def v2_model_route(handler: Callable[[], Response]):
        async def endpoint(request: Request) -> Response:
            try:
                this_model(request)
            except Rejected as e:
                return refused(e)
            return handler()
        return endpoint

    v2_model = v2_model_route(lambda: JSONResponse(oip.model_metadata(model_name, len(id2label))))
    v2_model_ready = v2_model_route(lambda: v2_readiness({"name": model_name}))

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
              Route("/openapi.json", openapi, methods=["GET"]), Route("/docs", docs, methods=["GET"]),
              Route("/v2", v2_server, methods=["GET"]), Route("/v2/health/live", v2_live, methods=["GET"]),
              Route("/v2/health/ready", v2_server_ready, methods=["GET"]),
              Route("/v2/models/{name}", v2_model, methods=["GET"]),
              Route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"]),
              Route("/v2/models/{name}/infer", infer, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                     middleware=[Middleware(CloseWhenDraining, draining=draining),
                                 Middleware(TimingMiddleware, metrics=metrics, routes=ROUTES)])
