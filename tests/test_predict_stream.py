"""The prediction command line at scale: one text per line streams JSON lines as batches finish,
a pause in the input does not hold answers back, ``--output`` is atomic, progress reaches stderr."""

import io
import json
import os
import selectors
import subprocess
import sys
import time

import pytest

from flaxsst import Classifier
from flaxsst.predict_stream import Progress, line_chunks
from tests.commands import ROOT, assert_one_line_error
from tests.fixtures import sentences


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=64)


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _predict(model_dir, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "flaxsst.predict", "--model", str(model_dir), *args],
                          input=stdin, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)


def test_lines_are_answered_as_json_lines_in_input_order(clf, tiny_model_dir, tmp_path):
    texts = (sentences() + ["", "the film was great"]) * 40  # more lines than one chunk of 8 batches
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = _predict(tiny_model_dir, "--input", str(path), "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    expected = clf(texts)
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-6)


def test_a_line_is_answered_before_the_input_closes(tiny_model_dir):
    process = subprocess.Popen([sys.executable, "-m", "flaxsst.predict", "--model", str(tiny_model_dir)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env(), cwd=ROOT)
    try:
        process.stdin.write("good movie\n")
        process.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=120), "no answer to the first line while the input stays open"
        first = json.loads(process.stdout.readline())
        assert set(first) == {"label", "score"}
        process.stdin.write("bad movie\n")
        process.stdin.close()
        rest = process.stdout.read().splitlines()
        assert process.wait(timeout=60) == 0, process.stderr.read()
        assert len(rest) == 1 and set(json.loads(rest[0])) == {"label", "score"}
    finally:
        process.kill()
        process.wait()


def test_json_request_is_answered_with_a_json_list_and_format_jsonl_gives_lines(clf, tiny_model_dir):
    texts = ["a fine film", "awful , boring"]
    request = json.dumps({"input_data": texts})
    as_list = _predict(tiny_model_dir, stdin=request)
    as_lines = _predict(tiny_model_dir, "--format", "jsonl", stdin=request)
    assert as_list.returncode == 0 and as_lines.returncode == 0, as_list.stderr + as_lines.stderr
    expected = [p["label"] for p in clf(texts)]
    assert [p["label"] for p in json.loads(as_list.stdout)] == expected
    assert [json.loads(line)["label"] for line in as_lines.stdout.splitlines()] == expected


def test_format_json_on_lines_writes_one_list(clf, tiny_model_dir):
    result = _predict(tiny_model_dir, "--format", "json", stdin="a fine film\nawful , boring\n")
    assert result.returncode == 0, result.stderr
    assert [p["label"] for p in json.loads(result.stdout)] == [p["label"] for p in clf(["a fine film", "awful , boring"])]
    empty = _predict(tiny_model_dir, "--format", "json", stdin="")
    assert json.loads(empty.stdout) == []


def test_output_file_is_complete_or_left_as_it_was(clf, tiny_model_dir, tmp_path):
    good, bad, out = tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "answers.jsonl"
    good.write_text("a fine film\nawful , boring\n", encoding="utf-8")
    bad.write_bytes(b"a fine film\n" * 3000 + b"caf\xe9\n")
    assert _predict(tiny_model_dir, "--input", str(good), "--output", str(out)).returncode == 0
    before = out.read_bytes()
    assert [json.loads(line)["label"] for line in before.decode().splitlines()] == \
        [p["label"] for p in clf(["a fine film", "awful , boring"])]
    result = _predict(tiny_model_dir, "--input", str(bad), "--output", str(out))
    assert_one_line_error(result, f"--input {bad}", "line 3001", "0xe9")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "bad.txt", "good.txt"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_without_a_terminal_is_a_line_every_few_seconds_with_the_pace_after_the_first_chunk():
    clock, err = FakeClock(), io.StringIO()
    progress = Progress(total=1000, stream=err, every=5.0, clock=clock)
    clock.now = 30.0  # the first chunk also compiles
    progress.update(100)
    for _ in range(4):
        clock.now += 2.0  # then 100 lines every 2 s
        progress.update(100)
    lines = err.getvalue().splitlines()
    assert len(lines) == 2, lines  # at 30 s and at 36 s
    # at 36 s: 600 lines left at 2 s a hundred, not at the first chunk's 30 s a hundred
    assert lines[-1].startswith("predict: 400/1000 (40%) lines") and lines[-1].endswith("ETA 0:00:12"), lines
    progress.close()
    assert err.getvalue().splitlines()[-1].startswith("predicted 500/1000 (50%) lines")


def test_a_short_job_prints_no_progress():
    err = io.StringIO()
    progress = Progress(total=None, stream=err, every=5.0)
    progress.update(3)
    progress.close()
    assert err.getvalue() == ""


def test_chunks_end_when_the_input_pauses():
    read_fd, write_fd = os.pipe()
    reader, writer = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    writer.write(b"one\ntwo\n")
    writer.flush()
    chunks = line_chunks(reader, [], chunk_lines=100, source="stdin", pause=0.05)
    began = time.monotonic()
    assert next(chunks) == ["one", "two"]
    assert time.monotonic() - began < 5
    writer.write(b"three\r\n")
    writer.close()
    assert list(chunks) == [["three"]]


def test_sigterm_while_writing_output_leaves_the_old_file_and_no_temporary_one(tiny_model_dir, tmp_path):
    lines, out = tmp_path / "lines.txt", tmp_path / "answers.jsonl"
    lines.write_text("a fine film , and a long one of the series\n" * 200_000, encoding="utf-8")
    out.write_text("the old answers\n")
    process = subprocess.Popen([sys.executable, "-m", "flaxsst.predict", "--model", str(tiny_model_dir),
                                "--input", str(lines), "--output", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 300
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".answers") and p.stat().st_size > 0]:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.terminate()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert out.read_text() == "the old answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "lines.txt"]


def test_an_output_in_a_missing_folder_is_one_line_before_the_model_loads(tmp_path):
    result = _predict(tmp_path / "no-model", "--output", str(tmp_path / "nope" / "answers.jsonl"), stdin="x\n")
    assert_one_line_error(result, f"--output {tmp_path / 'nope' / 'answers.jsonl'}: the folder", "does not exist")
