"""flaxsst.serve as a client sees it: real server processes on 127.0.0.1, real HTTP, answers
checked against ``Classifier`` and transformers' pipeline on the same texts."""

import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import transformers

from flaxsst import Classifier
from flaxsst.metrics import softmax
from tests.commands import assert_one_line_error, command_env, run
from tests.serving import ServerProcess, model_flags, post_all, run_async, served_classifier, texts_of

CARD = ["Today was an amazing day!", "It was an unfortunate series of events."]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return served_classifier(tiny_model_dir, MAX_LENGTH)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """One server for the tests that do not stop it; records /ready as first seen, before warm-up."""
    proc = ServerProcess(["--model", str(tiny_model_dir), *model_flags(MAX_LENGTH), "--max-texts", "50",
                          "--max-body-bytes", "20000", "--max-batch-delay-ms", "5"])
    proc.first_ready = httpx.get(f"{proc.url}/ready", timeout=10)
    proc.ready_after_s = proc.wait_ready()
    yield proc
    assert proc.stop() == 0, proc.stderr()


def assert_same_predictions(got: list[dict], clf: Classifier, texts: list[str]) -> None:
    expected = clf(texts)
    assert [p["label"] for p in got] == [p["label"] for p in expected], texts
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-5)


def test_ready_is_503_until_every_program_is_warm_then_200(server, clf):
    assert server.first_ready.status_code == 503
    warming = server.first_ready.json()
    assert warming["status"] == "warming up" and warming["programs"] == len(clf.program_shapes())
    assert 0 <= warming["done"] < warming["programs"] and warming["elapsed_s"] >= 0 and "eta_s" in warming
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["programs"] == len(clf.program_shapes())
    assert "ready: 12 programs warm" in server.stderr()
    for route in ("/health", "/"):
        assert httpx.get(f"{server.url}{route}").json() == {"status": "alive"}


def test_the_card_sample_is_answered_as_the_card_shows(server, clf, tiny_model_dir):
    response = httpx.post(f"{server.url}/score", json={"input_data": CARD})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    got = response.json()
    assert all(set(p) == {"label", "score"} for p in got)
    reference = transformers.pipeline("text-classification", model=str(tiny_model_dir), device="cpu")(
        CARD, truncation=True, max_length=MAX_LENGTH)
    assert [p["label"] for p in got] == [p["label"] for p in reference]
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in reference], atol=1e-5)
    assert_same_predictions(got, clf, CARD)
    # the same texts as a top-level list, and a single string as a list of one
    assert_same_predictions(httpx.post(f"{server.url}/score", json=CARD).json(), clf, CARD)
    assert_same_predictions(httpx.post(f"{server.url}/score", json={"input_data": CARD[0]}).json(), clf, CARD[:1])
    assert httpx.post(f"{server.url}/score", json={"input_data": []}).json() == []


def test_200_concurrent_requests_each_get_their_own_predictions_in_order(server, clf):
    requests = [texts_of(seed, 1 + seed % 5) for seed in range(200)]
    responses = run_async(post_all(f"{server.url}/score", [{"input_data": texts} for texts in requests]))
    assert [r.status_code for r in responses] == [200] * 200
    flat = [text for texts in requests for text in texts]
    expected = clf.logits(flat)
    row = 0
    for texts, response in zip(requests, responses):
        want = clf.predictions(expected[row : row + len(texts)])
        row += len(texts)
        got = response.json()
        assert [p["label"] for p in got] == [p["label"] for p in want]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)
    # the texts of different requests shared batches
    assert max(int(r.headers["x-batch-requests"]) for r in responses) > 1


def test_predict_follows_text_embeddings_inference(server, clf):
    url = f"{server.url}/predict"
    texts = ["the film was great", "awful , boring", "a"]
    logits = clf.logits(texts)
    probs = softmax(logits)

    def expected(row, scores):
        order = np.argsort(-scores[row])
        return [(clf.config.id2label[int(k)], scores[row, k]) for k in order]

    single = httpx.post(url, json={"inputs": texts[0]}).json()
    assert [p["label"] for p in single] == [label for label, _ in expected(0, probs)]
    np.testing.assert_allclose([p["score"] for p in single], [s for _, s in expected(0, probs)], atol=1e-5)
    one = httpx.post(url, json={"inputs": [texts[0]]}).json()
    assert [p["label"] for p in one] == [p["label"] for p in single]
    for inputs in ([[t] for t in texts], texts):  # three strings are a batch too
        batch = httpx.post(url, json={"inputs": inputs, "truncate": True}).json()
        assert len(batch) == 3
        for row, answer in enumerate(batch):
            assert [p["label"] for p in answer] == [label for label, _ in expected(row, probs)]
            np.testing.assert_allclose([p["score"] for p in answer], [s for _, s in expected(row, probs)], atol=1e-5)
    raw = httpx.post(url, json={"inputs": texts[1], "raw_scores": True}).json()
    np.testing.assert_allclose([p["score"] for p in raw], [s for _, s in expected(1, logits)], atol=1e-5)
    pair = httpx.post(url, json={"inputs": ["a premise", "a hypothesis"]})
    assert pair.status_code == 422 and "sentence pair" in pair.json()["error"]


@pytest.mark.parametrize("body, status, named", [
    (b'{"input_data": ["a", ', 400, "not valid JSON"),
    (b'{"input_data": ["caf\xe9"]}', 400, "not UTF-8 text (byte 0xe9 at offset 20)"),
    (json.dumps({"input_data": ["fine", 3]}).encode(), 422, "input_data[1] is a number, expected a string"),
    (json.dumps({"input_data": ["fine", None]}).encode(), 422, "input_data[1] is null"),
    (json.dumps(["ok", ["nested"]]).encode(), 422, "the body[1] is a list"),
    (json.dumps({"inputs": ["x"]}).encode(), 422, "input_data"),
    (json.dumps({"input_data": "x", "more": 1})[:-1].encode() + b"}", 200, ""),
    (b'{"input_data": ["fine", "caf\\udce9"]}', 422, "input 1 is not Unicode text"),
    (b'42', 422, "got a number"),
    (json.dumps({"input_data": ["x"] * 51}).encode(), 413, "51 texts, more than --max-texts 50"),
    (json.dumps({"input_data": ["x" * 30000]}).encode(), 413, "more than --max-body-bytes 20000"),
])
def test_a_bad_request_is_a_json_error_naming_the_problem_and_the_server_keeps_serving(server, clf, body, status, named):
    response = httpx.post(f"{server.url}/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status != 200:
        assert named in response.json()["error"] and response.json()["error_type"]
    assert_same_predictions(httpx.post(f"{server.url}/score", json=CARD).json(), clf, CARD)


def test_a_streamed_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(40):
            yield b'"' + b"x" * 1000 + b'",'

    response = httpx.post(f"{server.url}/score", content=chunks())  # chunked: no Content-Length
    assert response.status_code == 413 and "--max-body-bytes 20000" in response.json()["error"]


def test_a_client_that_sends_all_of_a_body_over_the_limit_before_reading_gets_the_413(server):
    """urllib writes the whole body, then reads: the server reads (and drops) the rest before it answers,
    so the client gets the 413 and not a connection reset."""
    import urllib.error
    import urllib.request

    body = json.dumps({"input_data": ["x" * 1000] * 16000}).encode()  # 16 MB against --max-body-bytes 20000
    request = urllib.request.Request(f"{server.url}/score", data=body, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 413 and "--max-body-bytes 20000" in json.loads(answer.value.read())["error"]


def test_json_nested_too_deeply_is_400_not_500(server, clf):
    response = httpx.post(f"{server.url}/score", content=b"[" * 9000 + b"]" * 9000)
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"], response.text
    assert_same_predictions(httpx.post(f"{server.url}/score", json=CARD).json(), clf, CARD)


def test_predict_names_a_wrong_request(server):
    url = f"{server.url}/predict"
    for body, named in (({"input_data": ["x"]}, '{"inputs"'), ({"inputs": 3}, "inputs must be a string or a list"),
                        ({"inputs": [["a"], 5, ["b"]]}, "inputs[1] is a number"),
                        ({"inputs": "x", "raw_scores": "yes"}, "raw_scores must be true or false")):
        response = httpx.post(url, json=body)
        assert response.status_code == 422 and named in response.json()["error"], response.text


def test_every_answer_has_timing_headers_and_metrics_count_them(server):
    for response in (httpx.post(f"{server.url}/score", json=CARD), httpx.get(f"{server.url}/nope"),
                     httpx.post(f"{server.url}/score", content=b"{")):
        for name in ("x-total-time", "x-queue-time", "x-inference-time", "x-tokenization-time"):
            assert float(response.headers[name]) >= 0, (name, response.headers)
    assert httpx.get(f"{server.url}/nope").json()["error_type"] == "NotFound"
    scored = httpx.post(f"{server.url}/score", json=CARD)
    assert float(scored.headers["x-inference-time"]) > 0
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for series in ('flaxsst_requests_total{route="/score",status="200"}', 'route="other",status="404"',
                   "flaxsst_queue_seconds_bucket", "flaxsst_inference_seconds_bucket", "flaxsst_batch_texts_bucket",
                   'flaxsst_request_seconds_bucket{le="0.1",route="/score"}', "flaxsst_queue_requests",
                   "flaxsst_ready 1.0"):
        assert series in text, series


def test_nothing_compiles_while_serving_whatever_the_batch_shape(server, clf):
    """Requests of every length (1 to 16 tokens) and many sizes, alone and at once, take only programs the
    warm-up readied: the server counts every XLA compile after /ready turned 200, and there is none."""
    words = [" ".join(["word"] * n) for n in range(0, 20)]
    bodies = [{"input_data": words[:k]} for k in range(1, 20)] + [{"input_data": [w]} for w in words]
    responses = run_async(post_all(f"{server.url}/score", bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for body, response in zip(bodies, responses):
        assert_same_predictions(response.json(), clf, body["input_data"])
    assert "flaxsst_compiles_while_serving 0.0" in httpx.get(f"{server.url}/metrics").text


def test_openapi_schema_and_docs_describe_the_routes(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/score", "/predict", "/health", "/ready", "/metrics"} <= set(schema["paths"])
    assert schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["example"] == {
        "input_data": CARD}
    assert "/openapi.json" in httpx.get(f"{server.url}/docs").text


def test_a_full_queue_is_429_with_retry_after_and_nothing_is_lost_or_wrong(tiny_model_dir, clf):
    proc = ServerProcess(["--model", str(tiny_model_dir), *model_flags(MAX_LENGTH), "--max-queue", "2",
                          "--max-batch-texts", "2", "--max-batch-delay-ms", "20"])
    try:
        proc.wait_ready()
        requests = [texts_of(1000 + i, 2) for i in range(100)]
        responses = run_async(post_all(f"{proc.url}/score", [{"input_data": t} for t in requests]))
        codes = [getattr(r, "status_code", r) for r in responses]
        assert set(codes) == {200, 429}, codes
        assert codes.count(429) >= 10
        for texts, response in zip(requests, responses):
            if response.status_code == 429:
                assert response.headers["retry-after"] == "1" and "--max-queue 2" in response.json()["error"]
            else:
                assert_same_predictions(response.json(), clf, texts)
        assert_same_predictions(httpx.post(f"{proc.url}/score", json=CARD).json(), clf, CARD)
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_past_the_timeout_is_504_and_the_server_keeps_serving(tiny_model_dir):
    proc = ServerProcess(["--model", str(tiny_model_dir), *model_flags(MAX_LENGTH), "--timeout-ms", "100",
                          "--max-batch-delay-ms", "400"])
    try:
        proc.wait_ready()
        response = httpx.post(f"{proc.url}/score", json=CARD)
        assert response.status_code == 504 and "--timeout-ms 100" in response.json()["error"]
        assert httpx.get(f"{proc.url}/ready").status_code == 200
        time.sleep(0.5)  # the dropped texts never reach a batch
        assert "flaxsst_batch_texts_count 0.0" in httpx.get(f"{proc.url}/metrics").text
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_sigterm_under_load_answers_every_request_received_then_exits_0(tiny_model_dir, clf):
    proc = ServerProcess(["--model", str(tiny_model_dir), *model_flags(MAX_LENGTH), "--max-batch-texts", "2",
                          "--drain-grace-s", "1.5"])
    proc.wait_ready()
    requests = [texts_of(2000 + i, 3) for i in range(80)]
    results = {}

    def load():
        results["load"] = run_async(post_all(f"{proc.url}/score", [{"input_data": t} for t in requests]))

    client = threading.Thread(target=load)
    client.start()
    time.sleep(0.3)  # every request is sent; the first batches are running
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    during_grace = httpx.get(f"{proc.url}/ready")
    late = httpx.post(f"{proc.url}/score", json=CARD)  # received within the grace: answered too
    client.join(120)
    code = proc.stop(timeout=60)
    assert code == 0, proc.stderr()
    assert time.monotonic() - signalled < 30
    assert during_grace.status_code == 503 and during_grace.json() == {"status": "draining"}
    assert late.status_code == 200
    assert_same_predictions(late.json(), clf, CARD)
    assert [getattr(r, "status_code", repr(r)) for r in results["load"]] == [200] * len(requests)
    for texts, response in zip(requests, results["load"]):
        assert_same_predictions(response.json(), clf, texts)
    assert "SIGTERM: draining" in proc.stderr() and "Traceback" not in proc.stderr()


def test_sigterm_during_the_warm_up_stops_it_and_exits_0_in_seconds(tiny_model_dir):
    """A pod deleted while it warms up: nothing to drain, so the server neither waits out the warm-up
    (here ~250 programs, tens of seconds) nor the drain grace."""
    proc = ServerProcess(["--model", str(tiny_model_dir), "--max-length", "128", "--batch-size", "8",
                          "--length-step", "2", "--drain-grace-s", "30"])
    time.sleep(1)
    warming = httpx.get(f"{proc.url}/ready").json()
    assert warming["status"] == "warming up" and warming["done"] < warming["programs"] / 2, warming
    signalled = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=60)
    assert code == 0, proc.stderr()
    assert time.monotonic() - signalled < 10, proc.stderr()
    assert "SIGTERM: stopping the warm-up" in proc.stderr() and "warm-up stopped at" in proc.stderr()
    assert "Traceback" not in proc.stderr()


@pytest.mark.parametrize("damage", ["missing", "bad config"])
def test_a_model_that_cannot_load_is_one_line_and_exit_2_before_the_port_opens(tiny_model_dir, tmp_path, damage):
    model = tmp_path / "model"
    if damage == "bad config":
        model.mkdir()
        for name in ("vocab.txt", "model.safetensors"):
            (model / name).write_bytes((tiny_model_dir / name).read_bytes())
        (model / "config.json").write_text("{not json", encoding="utf-8")
    result = run(["-m", "flaxsst.serve", "--model", str(model), "--port", "0"], env=command_env(devices=1), timeout=120)
    assert_one_line_error(result, str(model))
    assert "listening" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_2(tiny_model_dir, server):
    port = server.url.rsplit(":", 1)[1]
    result = run(["-m", "flaxsst.serve", "--model", str(tiny_model_dir), "--port", port, *model_flags(MAX_LENGTH)],
                 env=command_env(devices=1), timeout=120)
    assert_one_line_error(result, f"--port {port}", "cannot listen")
    past = run(["-m", "flaxsst.serve", "--model", str(tiny_model_dir), "--port", "99999", *model_flags(MAX_LENGTH)],
               env=command_env(devices=1), timeout=120)
    assert_one_line_error(past, "--port 99999", "cannot listen")
