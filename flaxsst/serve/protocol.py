"""The request formats, read from a JSON body into texts (every mistake a ``Rejected`` with one line
naming the key or index), and the HTTP answer to each reason a request is refused (``HTTP_STATUS``).

- the model card's endpoint (``POST /score``, and Azure ML's ``run``): ``{"input_data": [...]}``
  or a top-level JSON list of texts -> ``[{"label", "score"}, ...]``;
- text-embeddings-inference's classification (``POST /predict``): ``{"inputs": str | [...],
  "raw_scores": false, "truncate": false}`` -> every label with its score, highest first; a list
  of inputs gives a list of those. As in TEI, an input is a string or a list of one string, and a
  list of two strings is a sentence pair (which a single-sentence model refuses).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from flaxsst.metrics import softmax
from flaxsst.serve.service import (INVALID, MALFORMED, OVERLOADED, STOPPING, TIMEOUT, TOO_LARGE, UNKNOWN_MODEL, WARMING,
                                   Rejected)


# The HTTP status and error_type of each reason a request is refused.
HTTP_STATUS = {
    MALFORMED: (400, "Validation"),
    UNKNOWN_MODEL: (404, "NotFound"),
    TOO_LARGE: (413, "Payload"),
    INVALID: (422, "Validation"),
    OVERLOADED: (429, "Overloaded"),
    WARMING: (503, "Unhealthy"),
    STOPPING: (503, "Unhealthy"),
    TIMEOUT: (504, "Timeout"),
}


def http_error(error: Rejected, retry_after_s: int) -> tuple[int, dict[str, str], dict[str, str]]:
    """``(status, {"error", "error_type"}, headers)`` of a refused request: every HTTP front end's answer."""
    status, error_type = HTTP_STATUS[error.reason]
    headers = {"Retry-After": str(retry_after_s)} if error.reason in (OVERLOADED, WARMING) else {}
    return status, {"error": str(error), "error_type": error_type}, headers


def read_json(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8, a byte-order mark allowed); 400 naming where it breaks."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Rejected(MALFORMED, f"the body is not UTF-8 text (byte {body[e.start]:#04x} at offset {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected(MALFORMED, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # Python's decoder recurses once per nested list or object
        raise Rejected(MALFORMED, "the body is JSON nested too deeply to read (a list of texts needs two levels)") from None


def check_texts(texts: Any, where: str) -> list[str]:
    """``texts`` as a list of strings; 422 naming ``where[i]`` for the first item that is not one."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, list):
        raise Rejected(INVALID, f"{where} must be a list of strings, got {json_type(texts)}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise Rejected(INVALID, f"{where}[{index}] is {json_type(text)}, expected a string")
    return texts


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def score_texts(request: Any) -> list[str]:
    """The texts of a card request: ``{"input_data": [...]}`` or a JSON list of texts."""
    if isinstance(request, dict):
        if "input_data" not in request:
            raise Rejected(INVALID, f'a JSON object must be {{"input_data": [...]}}; got keys {sorted(request)}')
        return check_texts(request["input_data"], "input_data")
    if isinstance(request, list):
        return check_texts(request, "the body")
    raise Rejected(INVALID, f'the body must be {{"input_data": [...]}} or a list of strings, got {json_type(request)}')


@dataclasses.dataclass(frozen=True)
class PredictRequest:
    """A TEI ``/predict`` request: ``texts``, whether it was one input (``single``), ``raw_scores``."""

    texts: list[str]
    single: bool
    raw_scores: bool


def predict_request(request: Any) -> PredictRequest:
    """A TEI classification request (``inputs``, ``raw_scores``, ``truncate``, ``truncation_direction``)."""
    if not isinstance(request, dict) or "inputs" not in request:
        got = f"keys {sorted(request)}" if isinstance(request, dict) else json_type(request)
        raise Rejected(INVALID, f'the body must be {{"inputs": "text" | ["text", ...]}}; got {got}')
    for key in ("raw_scores", "truncate"):
        if not isinstance(request.get(key, False), bool):
            raise Rejected(INVALID, f"{key} must be true or false, got {json_type(request[key])}")
    direction = request.get("truncation_direction", "right")
    if direction not in ("right", "Right"):
        raise Rejected(INVALID, f"truncation_direction={direction!r}: this server truncates on the right only")
    inputs = request["inputs"]
    raw_scores = request.get("raw_scores", False)
    if isinstance(inputs, str):
        return PredictRequest([inputs], True, raw_scores)
    if not isinstance(inputs, list):
        raise Rejected(INVALID, f"inputs must be a string or a list, got {json_type(inputs)}")
    if len(inputs) == 2 and all(isinstance(item, str) for item in inputs):
        raise Rejected(INVALID, 'inputs of two strings is a sentence pair (as in text-embeddings-inference), which '
                               'this single-sentence model does not take; send a batch as [["text"], ["text"]]')
    if len(inputs) == 1 and isinstance(inputs[0], str):
        return PredictRequest(inputs, True, raw_scores)
    texts = []
    for index, item in enumerate(inputs):
        if isinstance(item, list) and len(item) == 1:
            item = item[0]
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item):
            raise Rejected(INVALID, f"inputs[{index}] is a sentence pair, which this single-sentence model does not take")
        if not isinstance(item, str):
            raise Rejected(INVALID, f"inputs[{index}] is {json_type(item)}, expected a string or a list of one string")
        texts.append(item)
    return PredictRequest(texts, False, raw_scores)


def predict_response(logits: np.ndarray, id2label: dict[int, str], request: PredictRequest) -> Any:
    """Every label with its score (softmax, or the logits with ``raw_scores``), highest first, per text."""
    scores = logits if request.raw_scores else softmax(logits)
    answers = []
    for row in np.asarray(scores, np.float64):
        order = np.argsort(-row, kind="stable")
        answers.append([{"score": float(row[k]), "label": id2label[int(k)]} for k in order])
    return answers[0] if request.single else answers
