"""Azure ML scoring script: the same model, with the same shared batches, under Azure ML's own
inference server (``azureml-inference-server-http``, command ``azmlinfsrv``: Flask on gunicorn).

``init()`` loads ``Classifier`` from ``AZUREML_MODEL_DIR`` (or the one folder below it holding
``config.json``, as a registered model is mounted), starts a ``Batcher`` and waits until every
program is warm; ``run(raw_data)`` answers the card's ``{"input_data": [...]}`` (or a JSON list of
texts) through that batcher, so the requests of all of a worker's threads share batches. Run one
worker with threads (each worker process would hold its own model and compile on its own)::

    GUNICORN_CMD_ARGS="--threads 16" azmlinfsrv --model_dir EXPORT_DIR --worker_count 1 \\
        --entry_script "$(python -c 'import flaxsst.serve.azureml_score as s; print(s.__file__)')"

Settings from the environment (their ``flaxsst.serve`` flags' defaults): ``FLAXSST_MAX_LENGTH``,
``FLAXSST_BATCH_SIZE``, ``FLAXSST_LENGTH_STEP``, ``FLAXSST_DTYPE``, ``FLAXSST_MAX_BATCH_TEXTS``, ``FLAXSST_MAX_BATCH_TOKENS``,
``FLAXSST_MAX_BATCH_DELAY_MS``, ``FLAXSST_MAX_QUEUE``, ``FLAXSST_MAX_TEXTS``, ``FLAXSST_TIMEOUT_MS``.
A request the client got wrong is a JSON error ``{"error", "error_type"}`` with its 4xx status
(the same words as ``flaxsst.serve``'s), never the server's 500.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any

from flaxsst.serve import protocol

classifier = None
batcher = None
settings: dict[str, Any] = {}


def model_folder(root: str) -> Path:
    """``root`` if it holds ``config.json``, else the one folder below it (two levels at most) that does."""
    path = Path(root)
    if (path / "config.json").is_file():
        return path
    found = sorted({p.parent for p in [*path.glob("*/config.json"), *path.glob("*/*/config.json")]})
    if len(found) != 1:
        from flaxsst.errors import CheckpointError

        raise CheckpointError(f"AZUREML_MODEL_DIR={root}: expected one model folder with config.json, found "
                              f"{[str(p) for p in found] or 'none'}")
    return found[0]


def env_number(name: str, default, kind=int):
    value = os.environ.get(name)
    return default if value in (None, "") else kind(value)


def init() -> None:
    global classifier, batcher
    import jax

    from flaxsst import Classifier
    from flaxsst.serve.batcher import Batcher
    from flaxsst.serve.server import ACCELERATOR_DEFAULTS, CPU_DEFAULTS

    classifier = Classifier.from_pretrained(model_folder(os.environ["AZUREML_MODEL_DIR"]),
                                            dtype=os.environ.get("FLAXSST_DTYPE", "float32"),
                                            batch_size=env_number("FLAXSST_BATCH_SIZE", None),
                                            length_step=env_number("FLAXSST_LENGTH_STEP", None),
                                            max_length=env_number("FLAXSST_MAX_LENGTH", 128), key="AZUREML_MODEL_DIR")
    defaults = CPU_DEFAULTS if jax.default_backend() == "cpu" else ACCELERATOR_DEFAULTS
    settings.update(max_texts=env_number("FLAXSST_MAX_TEXTS", 1024),
                    timeout_s=env_number("FLAXSST_TIMEOUT_MS", 30000, float) / 1e3)
    batcher = Batcher(classifier, max_batch_texts=env_number("FLAXSST_MAX_BATCH_TEXTS",
                                                                 defaults["batches_per_call"] * classifier.batch_size),
                      max_batch_tokens=env_number("FLAXSST_MAX_BATCH_TOKENS", defaults["max_batch_tokens"]),
                      max_delay_s=env_number("FLAXSST_MAX_BATCH_DELAY_MS", defaults["max_batch_delay_ms"], float) / 1e3,
                      max_queue=env_number("FLAXSST_MAX_QUEUE", 256))
    batcher.start()
    batcher.ready.wait()


def answer(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    from azureml_inference_server_http.api.aml_response import AMLResponse

    return AMLResponse(body, status, response_headers=headers or {}, json_str=True)


def run(raw_data: str | bytes):
    """The card's request -> ``[{"label", "score"}, ...]`` in its order; a 4xx JSON error otherwise."""
    from flaxsst.serve.batcher import QueueFull, Stopped

    arrived = time.perf_counter()
    try:
        body = raw_data.encode("utf-8") if isinstance(raw_data, str) else raw_data
        texts = protocol.score_texts(protocol.read_json(body))
        if len(texts) > settings["max_texts"]:
            raise protocol.ClientError(413, f"{len(texts)} texts, more than FLAXSST_MAX_TEXTS {settings['max_texts']}",
                                       "Payload")
        try:
            ids = classifier.encode(texts)
        except (TypeError, ValueError) as e:
            raise protocol.ClientError(422, str(e)) from None
        try:
            future = batcher.submit(ids)
        except QueueFull as e:
            raise protocol.ClientError(429, f"overloaded: {e}", "Overloaded") from None
        except Stopped as e:
            raise protocol.ClientError(503, str(e), "Unhealthy") from None
        try:
            job = future.result(max(settings["timeout_s"] - (time.perf_counter() - arrived), 0.0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise protocol.ClientError(504, f"not answered within FLAXSST_TIMEOUT_MS "
                                       f"{settings['timeout_s'] * 1e3:.0f}", "Timeout") from None
    except protocol.ClientError as e:
        return answer({"error": str(e), "error_type": e.error_type}, e.status,
                      {"Retry-After": "1"} if e.status == 429 else None)
    return answer(classifier.predictions(job.logits), 200, {
        "x-queue-time": f"{job.queue_s * 1e3:.3f}", "x-inference-time": f"{job.inference_s * 1e3:.3f}",
        "x-batch-requests": str(job.batch_requests)})
