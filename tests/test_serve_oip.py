"""The Open Inference Protocol (v2) routes as KServe's and Triton's clients use them: Triton's own HTTP
client (``tritonclient[http]``) against a real server process, with JSON and with binary tensors,
answers checked against ``Classifier`` on the same texts."""

import json
import struct

import httpx
import numpy as np
import pytest

from flaxsst.metrics import softmax
from tests.serving import ServerProcess, model_flags, served_classifier, texts_of

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return served_classifier(tiny_model_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """A server whose model folder is named ``tiny-hf...``, served under ``--model-name sst2``."""
    proc = ServerProcess(["--model", str(tiny_model_dir), *model_flags(MAX_LENGTH), "--model-name", "sst2"])
    proc.first_v2_ready = httpx.get(f"{proc.url}/v2/health/ready", timeout=10)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.stderr()


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


def infer(client, texts, binary_in: bool, outputs=None, shape=None):
    tensor = httpclient.InferInput("text", shape or [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape or [len(texts)]),
                               binary_data=binary_in)
    return client.infer("sst2", [tensor], outputs=outputs, request_id="r-1")


def test_health_and_metadata_through_tritons_client(server, client, clf):
    assert server.first_v2_ready.status_code == 400  # the protocol's "not ready" while warming up
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sst2")
    assert client.get_server_metadata()["name"] == "flaxsst"
    meta = client.get_model_metadata("sst2")
    assert meta["name"] == "sst2"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"label": "BYTES", "score": "FP32", "logits": "FP32"}
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("another")
    assert not client.is_model_ready("another")


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-input", "json-input"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["binary-output", "json-output", "unnamed-outputs"])
def test_infer_answers_classifiers_logits_and_labels(client, clf, binary_in, binary_out):
    texts = ["Today was an amazing day!", "It was an unfortunate series of events.", "héllo wörld ✓", *texts_of(3, 5)]
    outputs = None if binary_out is None else [httpclient.InferRequestedOutput(name, binary_data=binary_out)
                                               for name in ("label", "score", "logits")]
    result = infer(client, texts, binary_in, outputs)
    logits = clf.logits(texts)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    probs = softmax(logits)
    labels = [clf.config.id2label[int(k)] for k in probs.argmax(-1)]
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == labels
    np.testing.assert_allclose(result.as_numpy("score"), probs.max(-1), atol=1e-5)
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == "sst2"


def test_an_n_by_1_tensor_and_one_output(client, clf):
    texts = texts_of(4, 3)
    result = infer(client, texts, True, [httpclient.InferRequestedOutput("score", binary_data=False)], shape=[3, 1])
    assert result.as_numpy("logits") is None
    np.testing.assert_allclose(result.as_numpy("score"), softmax(clf.logits(texts)).max(-1), atol=1e-5)


def test_kserve_json_request_by_hand(server, clf):
    """The v2 request as KServe's docs write it, without any client library."""
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["good film", "bad film"]}]}
    response = httpx.post(f"{server.url}/v2/models/sst2/infer", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(outputs["logits"]["shape"]),
                               clf.logits(["good film", "bad film"]), atol=1e-5)
    assert "x-inference-time" in response.headers


@pytest.mark.parametrize("body, header, status, named", [
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, None, 422, "texts are BYTES"),
    ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}, None, 422,
     "shape [2] says 2 texts; its data holds 1"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [3]}]}, None, 422,
     "inputs[0].data[0] is a number"),
    ({"inputs": []}, None, 422, "inputs holds 0 tensors"),
    ({"input": []}, None, 422, "got keys ['input']"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": [{"name": "x"}]},
     None, 422, "outputs must name some of"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 50}}]},
     "binary", 400, "binary_data_size 50 is more than"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "999", 400,
     "Inference-Header-Content-Length '999'"),
])
def test_bad_infer_requests_are_one_line_naming_the_key(server, body, header, status, named):
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if header == "binary":
        headers["Inference-Header-Content-Length"] = str(len(raw))
        raw += struct.pack("<I", 40) + b"short"
    elif header is not None:
        headers["Inference-Header-Content-Length"] = header
    response = httpx.post(f"{server.url}/v2/models/sst2/infer", content=raw, headers=headers)
    assert response.status_code == status, response.text
    assert named in response.json()["error"]


def test_another_models_name_is_404_naming_this_one(server):
    response = httpx.post(f"{server.url}/v2/models/bert/infer", json={"inputs": []})
    assert response.status_code == 404 and "this server serves 'sst2'" in response.json()["error"]


def test_the_model_name_defaults_to_the_folders_name(tiny_model_dir):
    from flaxsst.serve.server import default_model_name

    assert default_model_name("run/export") == "export" and default_model_name("run/export/") == "export"
    assert default_model_name("distilbert/distilbert-base-uncased-finetuned-sst-2-english") == \
        "distilbert-base-uncased-finetuned-sst-2-english"
    assert default_model_name(str(tiny_model_dir)) == tiny_model_dir.name
