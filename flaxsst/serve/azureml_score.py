"""Azure ML scoring script: the same model, with the same shared batches, under Azure ML's own
inference server (``azureml-inference-server-http``, command ``azmlinfsrv``: Flask on gunicorn).

``init()`` loads ``Classifier`` from ``AZUREML_MODEL_DIR`` (or the one folder below it holding
``config.json``, as a registered model is mounted), starts the serving pipeline
(``flaxsst.serve.service``) and waits until every program is warm; ``run(raw_data)`` answers the
card's ``{"input_data": [...]}`` (or a JSON list of texts) through it, so the requests of all of a
worker's threads share batches. Run one worker with threads (each worker process would hold its own model and compile on its own)::

    GUNICORN_CMD_ARGS="--threads 16" azmlinfsrv --model_dir EXPORT_DIR --worker_count 1 \\
        --entry_script "$(python -c 'import flaxsst.serve.azureml_score as s; print(s.__file__)')"

Settings from the environment (their ``flaxsst.serve`` flags' defaults): ``FLAXSST_MAX_LENGTH``,
``FLAXSST_BATCH_SIZE``, ``FLAXSST_LENGTH_STEP``, ``FLAXSST_DTYPE``, ``FLAXSST_MAX_BATCH_TEXTS``, ``FLAXSST_MAX_BATCH_TOKENS``,
``FLAXSST_MAX_BATCH_DELAY_MS``, ``FLAXSST_MAX_QUEUE``, ``FLAXSST_MAX_TEXTS``, ``FLAXSST_TIMEOUT_MS``.
Its programs and packed-dot kernel come from ``python -m flaxsst.serve --model M --prepare`` with the
same shape settings (``--max-length``, ``--batch-size``, ``--length-step``, ``--dtype``), run ahead
of time, so ``init()`` is ready in seconds.
A request the client got wrong is a JSON error ``{"error", "error_type"}`` with its 4xx status
(the same words as ``flaxsst.serve``'s), never the server's 500.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flaxsst.serve import protocol
from flaxsst.serve.service import Rejected

service = None
ENV_SETTINGS = {"FLAXSST_MAX_BATCH_TEXTS": ("max_batch_texts", int), "FLAXSST_MAX_BATCH_TOKENS": ("max_batch_tokens", int),
                "FLAXSST_MAX_BATCH_DELAY_MS": ("max_batch_delay_ms", float), "FLAXSST_MAX_QUEUE": ("max_queue", int),
                "FLAXSST_MAX_TEXTS": ("max_texts", int), "FLAXSST_TIMEOUT_MS": ("timeout_ms", float)}


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
    global service
    import jax

    from flaxsst.serve.service import Service, Settings, load_classifier

    classifier = load_classifier(model_folder(os.environ["AZUREML_MODEL_DIR"]),
                                 dtype=os.environ.get("FLAXSST_DTYPE", "float32"),
                                 batch_size=env_number("FLAXSST_BATCH_SIZE", None),
                                 length_step=env_number("FLAXSST_LENGTH_STEP", None),
                                 max_length=env_number("FLAXSST_MAX_LENGTH", 128), key="AZUREML_MODEL_DIR")
    given = {field: env_number(name, None, kind) for name, (field, kind) in ENV_SETTINGS.items()}
    settings = Settings(**{field: value for field, value in given.items() if value is not None})
    service = Service(classifier, settings.resolved(jax.default_backend(), classifier.batch_size),
                      setting_names={field: name for name, (field, _) in ENV_SETTINGS.items()})
    service.start()
    service.ready.wait()


def answer(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    from azureml_inference_server_http.api.aml_response import AMLResponse

    return AMLResponse(body, status, response_headers=headers or {}, json_str=True)


def run(raw_data: str | bytes):
    """The card's request -> ``[{"label", "score"}, ...]`` in its order; a 4xx JSON error otherwise."""
    deadline = time.perf_counter() + service.settings.timeout_s
    try:
        body = raw_data.encode("utf-8") if isinstance(raw_data, str) else raw_data
        result = service.classify(protocol.score_texts(protocol.read_json(body)), deadline)
    except Rejected as e:
        status, error, headers = protocol.http_error(e, service.settings.retry_after_s)
        return answer(error, status, headers)
    return answer(service.classifier.predictions(result.logits), 200, {
        "x-queue-time": f"{result.queue_s * 1e3:.3f}", "x-inference-time": f"{result.inference_s * 1e3:.3f}",
        "x-batch-requests": str(result.batch_requests)})
