"""flaxsst.serve.service, its batcher and flaxsst.serve.protocol without a server: a fake classifier
whose logits are worked out by hand from the token ids, so every row can be traced to its request."""

import threading
import time

import numpy as np
import pytest

from flaxsst.serve import protocol
from flaxsst.serve.batcher import QueueFull, Stopped
from flaxsst.serve.service import INVALID, MALFORMED, OVERLOADED, TIMEOUT, TOO_LARGE, Rejected, Service, Settings


class FakeClassifier:
    """logits of a text = [sum of its ids, its length]; records every batch it ran."""

    class config:
        num_labels = 2
        id2label = {0: "NEGATIVE", 1: "POSITIVE"}

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[list[list[int]]] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    programs_compiled = 0

    def program_shapes(self):
        return [(1, 4), (2, 4), (4, 4)]

    def warm_up(self, on_program=None, should_stop=None):
        for done in range(1, 4):
            on_program(done, 3)
        return 3

    def encode(self, texts):
        if any(not isinstance(text, str) for text in texts):
            raise TypeError("not a string")
        return [[len(word) for word in text.split()] for text in texts]

    def logits_of_ids(self, ids, progress=None):
        self.release.wait(10)
        time.sleep(self.delay_s)
        self.batches.append([list(seq) for seq in ids])
        return np.array([[sum(seq), len(seq)] for seq in ids], np.float32)


def expected(ids):
    return np.array([[sum(seq), len(seq)] for seq in ids], np.float32)


class Running:
    """A started ``Service`` seen as its batcher (``submit`` of token ids) plus ``stop``."""

    def __init__(self, service: Service):
        self.service = service
        self.submit = service.batcher.submit
        self.queue_depth = service.batcher.queue_depth

    def stop(self, timeout):
        self.service.stop(timeout)


def make(clf, **kwargs):
    settings = dict(max_batch_texts=4, max_batch_tokens=100, max_batch_delay_ms=50, max_queue=100)
    settings.update(kwargs)
    service = Service(clf, Settings(**settings))
    service.start()
    assert service.ready.wait(10) and service.warm_up.describe()["done"] == 3
    return Running(service)


def test_concurrent_requests_share_a_batch_and_get_their_own_rows_in_order():
    clf = FakeClassifier()
    batcher = make(clf, max_batch_texts=8)
    requests = [[[1, 2]], [[3], [4, 5, 6]], [[7, 8, 9, 10]]]
    futures = [batcher.submit(ids) for ids in requests]
    jobs = [f.result(10) for f in futures]
    for ids, job in zip(requests, jobs):
        np.testing.assert_array_equal(job.logits, expected(ids))
        assert job.batch_requests == 3
    assert clf.batches == [[[1, 2], [3], [4, 5, 6], [7, 8, 9, 10]]]
    batcher.stop(10)


def test_a_batch_holds_at_most_the_row_and_token_budget_and_a_request_may_span_batches():
    clf = FakeClassifier()
    clf.release.clear()  # let everything queue first
    batcher = make(clf, max_batch_texts=3, max_batch_tokens=5, max_batch_delay_ms=0)
    first = batcher.submit([[1]])
    time.sleep(0.1)  # the first batch is running (held), the rest waits
    big = [[k] * 2 for k in range(1, 8)]  # 7 texts of 2 tokens: batches of 2 by tokens (4 <= 5 < 6)
    futures = [batcher.submit(big), batcher.submit([[9] * 5])]
    clf.release.set()
    np.testing.assert_array_equal(futures[0].result(10).logits, expected(big))
    np.testing.assert_array_equal(futures[1].result(10).logits, expected([[9] * 5]))
    first.result(10)
    assert [len(batch) for batch in clf.batches] == [1, 2, 2, 2, 1, 1]
    assert all(len(b) <= 3 and (sum(map(len, b)) <= 5 or len(b) == 1) for b in clf.batches)
    batcher.stop(10)


def test_a_lone_request_waits_at_most_the_delay():
    clf = FakeClassifier()
    batcher = make(clf, max_batch_delay_ms=200)
    started = time.perf_counter()
    job = batcher.submit([[1, 2, 3]]).result(10)
    waited = time.perf_counter() - started
    assert 0.15 <= waited < 2 and 0.15 <= job.queue_s < 2
    full = time.perf_counter()
    batcher.submit([[1]] * 4).result(10)  # a full batch does not wait
    assert time.perf_counter() - full < 0.15
    batcher.stop(10)


def test_a_full_queue_refuses_and_a_cancelled_request_is_dropped():
    clf = FakeClassifier()
    clf.release.clear()
    batcher = make(clf, max_queue=2, max_batch_delay_ms=0)
    running = batcher.submit([[1]])
    time.sleep(0.1)
    waiting = [batcher.submit([[2]]), batcher.submit([[3]])]
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        batcher.submit([[4]])
    assert batcher.queue_depth() == (2, 2)
    assert waiting[0].cancel()
    clf.release.set()
    np.testing.assert_array_equal(waiting[1].result(10).logits, [[3, 1]])
    running.result(10)
    assert [[3]] in clf.batches and [[2]] not in [b for b in clf.batches]
    batcher.stop(10)
    with pytest.raises(Stopped):
        batcher.submit([[5]])


def test_stop_answers_everything_submitted():
    clf = FakeClassifier(delay_s=0.01)
    batcher = make(clf, max_batch_delay_ms=500)
    futures = [batcher.submit([[k]]) for k in range(10)]
    batcher.stop(10)
    assert [f.result(0).logits[0, 0] for f in futures] == list(range(10))


def test_an_empty_request_is_answered_at_once():
    batcher = make(FakeClassifier())
    assert batcher.submit([]).result(1).logits.shape == (0, 2)
    batcher.stop(10)


@pytest.mark.parametrize("request_, texts", [
    ({"input_data": ["a", "b"]}, ["a", "b"]), (["a"], ["a"]), ({"input_data": "a"}, ["a"]), ({"input_data": []}, []),
])
def test_score_requests(request_, texts):
    assert protocol.score_texts(request_) == texts


@pytest.mark.parametrize("request_, named", [
    ({"inputs": ["a"]}, "got keys ['inputs']"), ({"input_data": {"a": 1}}, "input_data must be a list of strings, got an object"),
    ({"input_data": ["a", True]}, "input_data[1] is a boolean"), ("text", "got a string"),
])
def test_score_requests_name_what_is_wrong(request_, named):
    with pytest.raises(Rejected, match=named.replace("[", r"\[").replace("]", r"\]")) as error:
        protocol.score_texts(request_)
    assert error.value.reason == INVALID and protocol.http_error(error.value, 1)[0] == 422


def test_predict_reads_inputs_as_text_embeddings_inference_does():
    assert protocol.predict_request({"inputs": "a"}) == protocol.PredictRequest(["a"], True, False)
    assert protocol.predict_request({"inputs": ["a"], "raw_scores": True}) == protocol.PredictRequest(["a"], True, True)
    assert protocol.predict_request({"inputs": [["a"], ["b"]]}).texts == ["a", "b"]
    assert protocol.predict_request({"inputs": ["a", "b", "c"]}) == protocol.PredictRequest(["a", "b", "c"], False, False)
    with pytest.raises(Rejected, match="sentence pair"):
        protocol.predict_request({"inputs": ["a", "b"]})
    with pytest.raises(Rejected, match=r"inputs\[0\] is a sentence pair"):
        protocol.predict_request({"inputs": [["a", "b"]]})


def test_predict_answers_every_label_highest_first():
    logits = np.array([[2.0, 0.0], [-1.0, 1.0]], np.float32)
    answer = protocol.predict_response(logits, {0: "NEGATIVE", 1: "POSITIVE"},
                                       protocol.PredictRequest(["x", "y"], False, False))
    e = np.exp(2.0)
    assert [[p["label"] for p in a] for a in answer] == [["NEGATIVE", "POSITIVE"], ["POSITIVE", "NEGATIVE"]]
    assert answer[0][0]["score"] == pytest.approx(e / (e + 1)) and answer[0][1]["score"] == pytest.approx(1 / (e + 1))
    raw = protocol.predict_response(logits[:1], {0: "NEGATIVE", 1: "POSITIVE"}, protocol.PredictRequest(["x"], True, True))
    assert raw == [{"score": 2.0, "label": "NEGATIVE"}, {"score": 0.0, "label": "POSITIVE"}]


def test_read_json_names_where_the_body_breaks():
    assert protocol.read_json(b'\xef\xbb\xbf["a"]') == ["a"]
    with pytest.raises(Rejected, match="not valid JSON: Expecting value at line 2 column 1"):
        protocol.read_json(b'[\n')


def test_classify_answers_texts_and_refuses_with_one_error_naming_the_setting():
    clf = FakeClassifier()
    running = make(clf, max_texts=3, max_queue=1, max_batch_delay_ms=0)
    service = running.service
    answer = service.classify(["a bb", "ccc"], time.perf_counter() + 10)
    np.testing.assert_array_equal(answer.logits, expected([[1, 2], [3]]))
    with pytest.raises(Rejected, match="4 texts, more than --max-texts 3") as too_many:
        service.classify(["a"] * 4, time.perf_counter() + 10)
    with pytest.raises(Rejected, match="not a string") as invalid:
        service.classify(["a", None], time.perf_counter() + 10)
    clf.release.clear()
    held = service.submit(["held"])[0]
    time.sleep(0.1)  # "held" is running, so the next waits in the queue and the one after finds it full
    with pytest.raises(Rejected, match="not answered within --timeout-ms") as late:
        service.classify(["waits"], time.perf_counter() + 0.2)
    waiting = service.submit(["waits too"])[0]
    with pytest.raises(Rejected, match=r"1 requests are waiting \(--max-queue 1\)") as full:
        service.classify(["refused"], time.perf_counter() + 10)
    clf.release.set()
    held.result(10), waiting.result(10)
    assert [e.value.reason for e in (too_many, invalid, late, full)] == [TOO_LARGE, INVALID, TIMEOUT, OVERLOADED]
    assert [protocol.http_error(e.value, 1)[0] for e in (too_many, invalid, late, full)] == [413, 422, 504, 429]
    assert protocol.http_error(full.value, 7)[2] == {"Retry-After": "7"}
    running.stop(10)


def test_a_front_end_names_its_own_settings_in_the_refusals():
    running = make(FakeClassifier(), max_texts=1)
    running.service.setting_names.update(max_texts="FLAXSST_MAX_TEXTS")
    with pytest.raises(Rejected, match="more than FLAXSST_MAX_TEXTS 1"):
        running.service.classify(["a", "b"], time.perf_counter() + 10)
    running.stop(10)


def test_json_nested_past_the_decoders_depth_is_a_malformed_request_not_a_crash():
    with pytest.raises(Rejected, match="nested too deeply") as error:
        protocol.read_json(b"[" * 100_000 + b"]" * 100_000)
    assert error.value.reason == MALFORMED and protocol.http_error(error.value, 1)[0] == 400


def test_a_request_during_the_warm_up_is_refused_at_once_with_retry_after():
    clf = FakeClassifier()
    release = threading.Event()
    clf.warm_up = lambda on_program=None, should_stop=None: release.wait(10) and 3
    service = Service(clf, Settings(max_batch_texts=4, max_batch_tokens=100, max_batch_delay_ms=0, max_queue=10))
    service.start()
    started = time.perf_counter()
    with pytest.raises(Rejected, match="warming up: 0/3 programs ready") as warming:
        service.classify(["a"], time.perf_counter() + 10)
    assert time.perf_counter() - started < 1
    assert protocol.http_error(warming.value, 2)[0] == 503 and protocol.http_error(warming.value, 2)[2] == {
        "Retry-After": "2"}
    release.set()
    assert service.ready.wait(10)
    np.testing.assert_array_equal(service.classify(["a bb"], time.perf_counter() + 10).logits, expected([[1, 2]]))
    service.stop(10)
