"""The Open Inference Protocol (v2), as KServe, Triton and MLServer speak it over HTTP: the request of
``POST /v2/models/{name}/infer`` read into texts, the answer written from logits, and the metadata.

A request holds one ``BYTES`` input (by convention named ``text``) of shape ``[N]`` or ``[N, 1]``: its
``data`` a JSON list of strings, or, with Triton's binary tensor extension (the
``Inference-Header-Content-Length`` header), the texts as 4-byte little-endian lengths and UTF-8
bytes after the JSON header. The answer's outputs are ``label`` (``BYTES [N]``), ``score``
(``FP32 [N]``, the label's softmax probability, as in the model card's answer) and ``logits``
(``FP32 [N, labels]``); an output asked for with ``"binary_data": true`` (or every output, with the
request parameter ``binary_data_output``, which Triton's client sends when it names none) comes as
binary data after the JSON header. Every mistake is a ``Rejected`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from flaxsst.metrics import softmax
from flaxsst.serve.protocol import check_texts, json_type, read_json
from flaxsst.serve.service import INVALID, MALFORMED, Rejected

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("label", "score", "logits")


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """The texts of an infer request, its ``id``, and which outputs it wants (``binary``: as binary data)."""

    texts: list[str]
    id: str | None
    outputs: tuple[str, ...]
    binary: frozenset[str]


def read_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request's body (JSON, or a JSON header of ``header_length`` bytes and binary tensors)."""
    if header_length is None:
        header, rest = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise Rejected(MALFORMED, f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                      f"body's {len(body)} bytes")
        header, rest = body[:int(header_length)], body[int(header_length):]
    request = read_json(header)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        got = f"keys {sorted(request)}" if isinstance(request, dict) else json_type(request)
        raise Rejected(INVALID, f'an infer request is {{"inputs": [{{"name": "text", "datatype": "BYTES", "shape": '
                                f'[N], "data": [...]}}]}}; got {got}')
    if len(request["inputs"]) != 1:
        raise Rejected(INVALID, f"inputs holds {len(request['inputs'])} tensors; this model takes one BYTES tensor of texts")
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict):
        raise Rejected(INVALID, f"inputs[0] is {json_type(tensor)}, expected an object")
    if tensor.get("datatype") != "BYTES":
        raise Rejected(INVALID, f"inputs[0].datatype is {tensor.get('datatype')!r}; texts are BYTES")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))):
        raise Rejected(INVALID, f"inputs[0].shape is {shape!r}; expected [N] or [N, 1]")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        texts = bytes_tensor(rest, size)
    elif "data" in tensor:
        texts = check_texts(flatten(tensor["data"]), "inputs[0].data")
    else:
        raise Rejected(INVALID, "inputs[0] has neither data nor parameters.binary_data_size")
    if len(texts) != shape[0]:
        raise Rejected(INVALID, f"inputs[0].shape {shape} says {shape[0]} texts; its data holds {len(texts)}")
    return InferRequest(texts, request.get("id"), *wanted_outputs(request))


def flatten(data: Any) -> Any:
    """``[[a], [b]]`` (an ``[N, 1]`` tensor) as ``[a, b]``; anything else as it is."""
    if isinstance(data, list) and all(isinstance(item, list) and len(item) == 1 for item in data):
        return [item[0] for item in data]
    return data


def bytes_tensor(data: bytes, size: Any) -> list[str]:
    """The texts of a binary ``BYTES`` tensor: each a 4-byte little-endian length and its UTF-8 bytes."""
    if not isinstance(size, int) or size < 0 or size > len(data):
        raise Rejected(MALFORMED, f"binary_data_size {size!r} is more than the {len(data)} bytes after the header")
    texts, offset = [], 0
    while offset < size:
        if offset + 4 > size:
            raise Rejected(MALFORMED, f"the binary tensor ends inside an element's length at byte {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + length > size:
            raise Rejected(MALFORMED, f"the binary tensor's element at byte {offset} runs past its {size} bytes")
        try:
            texts.append(data[offset + 4:offset + 4 + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise Rejected(MALFORMED, f"element {len(texts)} of the binary tensor is not UTF-8 text") from None
        offset += 4 + length
    return texts


def wanted_outputs(request: dict) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs a request names (all when it names none), and those it wants as binary data."""
    all_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = request.get("outputs")
    if asked is None:
        return OUTPUTS, frozenset(OUTPUTS if all_binary else ())
    if not isinstance(asked, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in asked):
        raise Rejected(INVALID, f"outputs must name some of {list(OUTPUTS)}; got {asked!r}")
    names = tuple(o["name"] for o in asked)
    binary = {o["name"] for o in asked if (o.get("parameters") or {}).get("binary_data", all_binary)}
    return names, frozenset(binary)


def infer_response(logits: np.ndarray, id2label: dict[int, str], model_name: str,
                   request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """The answer's body and headers (``Inference-Header-Content-Length`` when binary data follows)."""
    probs = softmax(logits)
    best = probs.argmax(axis=-1)
    tensors = {
        "label": ("BYTES", [len(best)], [id2label[int(k)] for k in best]),
        "score": ("FP32", [len(best)], probs[np.arange(len(best)), best].astype(np.float32)),
        "logits": ("FP32", list(logits.shape), np.asarray(logits, np.float32)),
    }
    outputs, blobs = [], []
    for name in request.outputs:
        datatype, shape, values = tensors[name]
        output = {"name": name, "datatype": datatype, "shape": shape}
        if name in request.binary:
            blob = (b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values) if datatype == "BYTES"
                    else values.tobytes())
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = values if datatype == "BYTES" else values.reshape(-1).tolist()
        outputs.append(output)
    answer = {"model_name": model_name, "outputs": outputs, **({"id": request.id} if request.id is not None else {})}
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))}


def model_metadata(model_name: str, num_labels: int) -> dict[str, Any]:
    return {"name": model_name, "versions": [], "platform": "flaxsst",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "score", "datatype": "FP32", "shape": [-1]},
                        {"name": "logits", "datatype": "FP32", "shape": [-1, num_labels]}]}


def server_metadata() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        flaxsst_version = version("flaxsst")
    except PackageNotFoundError:
        flaxsst_version = "unknown"
    return {"name": "flaxsst", "version": flaxsst_version, "extensions": ["binary_tensor_data"]}
