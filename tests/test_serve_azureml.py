"""flaxsst.serve.azureml_score under Azure ML's real inference server (azureml-inference-server-http),
over real HTTP on 127.0.0.1, answers checked against ``Classifier``.

Azure's server pins ``opentelemetry-api==1.33.0`` and older pydantic, so it may live in an
environment of its own: ``FLAXSST_AZUREML_PYTHON`` names that interpreter (with flaxsst installed);
otherwise this interpreter is used if it has the package, and the tests skip if neither does.
"""

import importlib.util
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

import flaxsst.serve.azureml_score
from flaxsst import Classifier
from tests.commands import ROOT
from tests.serving import free_port, post_all, run_async, stop_process, texts_of

CARD = ["Today was an amazing day!", "It was an unfortunate series of events."]
# azmlinfsrv listens on 0.0.0.0 and has no --host flag: loopback is set before its entry point runs
LOOPBACK_AZMLINFSRV = ("import azureml_inference_server_http.constants as c; c.DEFAULT_HOST = '127.0.0.1'; "
                       "from azureml_inference_server_http import amlserver; amlserver.run()")


def azureml_python() -> str:
    if os.environ.get("FLAXSST_AZUREML_PYTHON"):
        return os.environ["FLAXSST_AZUREML_PYTHON"]
    if importlib.util.find_spec("azureml_inference_server_http") is not None:
        return sys.executable
    pytest.skip("azureml-inference-server-http is not installed: set FLAXSST_AZUREML_PYTHON to an interpreter "
                "that has it and flaxsst (.ci/run makes one)")


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=16)


@pytest.fixture(scope="module")
def azmlinfsrv(tiny_model_dir, tmp_path_factory):
    """``azmlinfsrv`` with the scoring script: one gunicorn worker with 8 threads; the model mounted one
    folder down, as Azure mounts a registered model."""
    python = azureml_python()
    mount = tmp_path_factory.mktemp("azureml-model")
    os.symlink(tiny_model_dir, mount / "sst2-model")
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", GUNICORN_CMD_ARGS="--threads 8", FLAXSST_MAX_LENGTH="16",
               FLAXSST_BATCH_SIZE="4", FLAXSST_LENGTH_STEP="4", FLAXSST_MAX_BATCH_DELAY_MS="5", FLAXSST_MAX_TEXTS="50",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log = open(mount / "server.log", "w+")
    process = subprocess.Popen([python, "-c", LOOPBACK_AZMLINFSRV, "--entry_script", flaxsst.serve.azureml_score.__file__,
                                "--model_dir", str(mount), "--port", str(port), "--worker_count", "1"],
                               cwd=mount, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, (mount / "server.log").read_text()
            try:
                if httpx.post(f"{url}/score", json=CARD, timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"azmlinfsrv did not answer within 300 s:\n{(mount / 'server.log').read_text()}")
        yield url
    finally:
        stop_process(process)
        log.close()


def assert_same_predictions(got, clf, texts):
    expected = clf(texts)
    assert [p["label"] for p in got] == [p["label"] for p in expected], texts
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-5)


def test_the_card_sample_under_azmlinfsrv_equals_classifier(azmlinfsrv, clf):
    response = httpx.post(f"{azmlinfsrv}/score", json={"input_data": CARD})
    assert response.status_code == 200, response.text
    assert_same_predictions(response.json(), clf, CARD)
    assert_same_predictions(httpx.post(f"{azmlinfsrv}/score", json=CARD).json(), clf, CARD)
    assert httpx.get(f"{azmlinfsrv}/").status_code == 200  # Azure's liveness route


def test_concurrent_requests_share_batches_across_the_servers_threads(azmlinfsrv, clf):
    requests = [texts_of(3000 + i, 1 + i % 4) for i in range(40)]
    responses = run_async(post_all(f"{azmlinfsrv}/score", [{"input_data": t} for t in requests]))
    assert [getattr(r, "status_code", repr(r)) for r in responses] == [200] * len(requests)
    for texts, response in zip(requests, responses):
        assert_same_predictions(response.json(), clf, texts)
    assert max(int(r.headers["x-batch-requests"]) for r in responses) > 1


@pytest.mark.parametrize("body, status, named", [
    (b'{"input_data": [', 400, "not valid JSON"),
    (b'{"input_data": ["ok", 3]}', 422, "input_data[1] is a number"),
    (b'{"inputs": ["x"]}', 422, "input_data"),
    (('{"input_data": [%s]}' % ",".join(['"x"'] * 51)).encode(), 413, "more than FLAXSST_MAX_TEXTS 50"),
])
def test_a_bad_request_under_azmlinfsrv_is_a_4xx_naming_it(azmlinfsrv, clf, body, status, named):
    response = httpx.post(f"{azmlinfsrv}/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert named in response.json()["error"]
    assert_same_predictions(httpx.post(f"{azmlinfsrv}/score", json=CARD).json(), clf, CARD)
