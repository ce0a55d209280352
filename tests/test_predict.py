"""Classifier and its command line against transformers' text-classification pipeline."""

import json
import os
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flaxsst import Classifier
from tests.fixtures import sentences


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=64)


@pytest.fixture(scope="module")
def hf_pipeline(tiny_model_dir):
    return transformers.pipeline("text-classification", model=str(tiny_model_dir), device="cpu")


def test_predictions_equal_the_transformers_pipeline_in_input_order(clf, hf_pipeline):
    texts = sentences() + ["the film was great"] * 3 + ["bad"]
    ours = clf(texts)
    reference = hf_pipeline(texts, truncation=True, max_length=64)
    assert [p["label"] for p in ours] == [p["label"] for p in reference]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in reference], atol=1e-5)
    assert all(set(p) == {"label", "score"} and isinstance(p["score"], float) for p in ours)


def test_logits_are_float32_in_input_order(clf, tiny_model_dir):
    texts = sentences()
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = np.concatenate([model(**tok([t], return_tensors="pt")).logits.numpy() for t in texts])
    got = clf.logits(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 2)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_repeated_calls_reuse_a_few_compiled_shapes(tiny_model_dir):
    clf = Classifier.from_pretrained(tiny_model_dir, batch_size=8, max_length=64)
    rng = np.random.default_rng(0)
    for _ in range(12):
        n = int(rng.integers(1, 20))
        clf([" ".join(["film"] * int(rng.integers(0, 70))) for _ in range(n)])
    # on a CPU: lengths 2, 3, ..., 16, 18, ..., 32, 36, ..., 64 and row counts 1, 2, 4, 8, compiled only
    # as calls need them
    assert len(clf.program_shapes()) == (15 + 8 + 8) * 4
    assert compiled(clf) <= len(clf.program_shapes())


def test_warm_up_compiles_every_program_so_later_calls_compile_nothing(tiny_model_dir):
    clf = Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=16, length_step=4)
    assert clf.warm_up() == len(clf.program_shapes()) == 4 * 3  # lengths 4, 8, 12, 16 x rows 1, 2, 4
    before = compiled(clf)
    clf([" ".join(["film"] * n) for n in range(20)])
    assert compiled(clf) == before


def compiled(clf: Classifier) -> int:
    """Programs compiled so far, of both of Classifier's jitted forwards."""
    return clf.forward._cache_size() + (clf.small_forward._cache_size() if clf.small_forward else 0)


def test_without_packed_dots_a_small_cpu_batch_runs_xla_dots_and_gives_the_transformers_logits(tiny_model_dir,
                                                                                               monkeypatch):
    monkeypatch.setattr("flaxsst.packed_dot.load", lambda build=True: None)
    clf = Classifier.from_pretrained(tiny_model_dir, batch_size=4, max_length=64)
    if clf.small_forward is None:
        pytest.skip("this jaxlib has no YNNPACK fusion option: every CPU program uses the same dots")
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["a fine film", "dull", " ".join(["film"] * 30)]
    with torch.no_grad():
        expected = np.concatenate([model(**tok([t], return_tensors="pt")).logits.numpy() for t in texts])
    short = clf.logits(texts[:2])  # one batch: 2 rows x 5 tokens, at most CPU_SMALL_BATCH_TOKENS
    assert (clf.small_forward._cache_size(), clf.forward._cache_size()) == (1, 0)
    np.testing.assert_allclose(short, expected[:2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(clf.logits(texts[2:]), expected[2:], atol=1e-5, rtol=0)  # 32 tokens
    assert (clf.small_forward._cache_size(), clf.forward._cache_size()) == (1, 1)


def test_concurrent_batches_give_each_text_its_own_logits_in_input_order(tiny_model_dir):
    texts = [" ".join(["good", "bad", "film"][i % 3:] * (i % 7)) + f" {i}" for i in range(24)]
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = np.concatenate([model(**tok([t], return_tensors="pt")).logits.numpy() for t in texts])
    clf = Classifier.from_pretrained(tiny_model_dir, batch_size=2, concurrent_batches=3)
    running, most = [0], [0]
    lock = threading.Lock()
    forward_batch = clf.forward_batch

    def slow_forward_batch(ids, rows, length):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)  # long enough that the three threads' batches overlap
        logits = np.asarray(forward_batch(ids, rows, length))
        with lock:
            running[0] -= 1
        return logits

    clf.forward_batch = slow_forward_batch
    np.testing.assert_allclose(clf.logits(texts), expected, atol=1e-5, rtol=0)
    assert most[0] == 3


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_texts_packed_several_to_a_row_each_get_the_logits_they_get_alone(tiny_model_dir, dtype):
    rng = np.random.default_rng(2)
    words = ["good", "bad", "film", "the", "plot", "was", "not"]
    texts = [" ".join(rng.choice(words, int(rng.integers(0, 40)))) for _ in range(60)] + ["", "good"]
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = np.concatenate([model(**tok([t], truncation=True, max_length=48, return_tensors="pt")).logits.numpy()
                                   for t in texts])
    shapes = {"dtype": dtype, "batch_size": 8, "lengths": [8, 16, 24, 32, 48], "max_length": 48}
    alone = Classifier.from_pretrained(tiny_model_dir, **shapes)
    clf = Classifier.from_pretrained(tiny_model_dir, pack=True, **shapes)
    batches = clf.shapes.pack([len(ids) for ids in clf.encode(texts)])
    assert max(np.bincount(b.row).max() for b in batches) >= 3  # rows hold several texts
    got = clf.logits(texts)
    # int8 rounds each row's activations to levels: a float32 rounding apart can move one by a level
    np.testing.assert_allclose(got, alone.logits(texts), atol=1e-3 if clf.int8_lanes else 1e-5, rtol=0)
    if dtype == "float32" or not clf.int8_lanes:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert clf.warm_up() == len(clf.program_shapes())
    before = compiled(clf)
    np.testing.assert_allclose(clf.logits(texts[::-1]), got[::-1], atol=1e-5, rtol=0)
    assert compiled(clf) == before


def test_an_error_in_one_batch_is_raised_and_the_batches_not_started_are_dropped(tiny_model_dir):
    clf = Classifier.from_pretrained(tiny_model_dir, batch_size=1, concurrent_batches=2)
    calls = []

    def failing_forward_batch(ids, rows, length):
        calls.append(length)
        time.sleep(0.02)
        if len(calls) == 2:
            raise RuntimeError("batch 2 failed")
        return np.zeros((rows, 2), np.float32)

    clf.forward_batch = failing_forward_batch
    with pytest.raises(RuntimeError, match="batch 2 failed"):
        clf.logits(["film"] * 40)
    assert len(calls) < 10


def test_bad_concurrent_batches_is_one_line(tiny_model_dir):
    from flaxsst.errors import ConfigError

    with pytest.raises(ConfigError, match="concurrent_batches=0 must be at least 1"):
        Classifier.from_pretrained(tiny_model_dir, concurrent_batches=0)


def test_bfloat16_logits_follow_pytorch_autocast(tiny_model_dir):
    texts = sentences()
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = np.concatenate([model(**tok([t], return_tensors="pt")).logits.float().numpy() for t in texts])
    with torch.inference_mode():
        exact = np.concatenate([model(**tok([t], return_tensors="pt")).logits.numpy() for t in texts])
    got = Classifier.from_pretrained(tiny_model_dir, dtype="bfloat16").logits(texts)
    # as close to float32 as autocast is (bf16 rounds to 3 significant digits), and never wildly off
    assert np.abs(got - exact).max() <= max(2 * np.abs(autocast - exact).max(), 2e-2)


def test_bfloat16_inference_params_keep_the_layer_norms_in_float32(tiny_model_dir):
    from flaxsst.convert import load_pretrained
    from flaxsst.classifier import inference_params

    _, params = load_pretrained(tiny_model_dir)
    cast = inference_params(params, "bfloat16")
    layer = cast["distilbert"]["transformer"]["layer"]["0"]
    assert layer["sa_layer_norm"]["scale"].dtype == np.float32
    assert cast["distilbert"]["embeddings"]["LayerNorm"]["bias"].dtype == np.float32
    assert layer["ffn"]["lin1"]["kernel"].dtype == jnp.bfloat16
    assert cast["distilbert"]["embeddings"]["word_embeddings"]["embedding"].dtype == jnp.bfloat16
    assert inference_params(params, "float32") is params


def test_empty_list_gives_empty_list(clf):
    assert clf([]) == []
    assert clf.logits([]).shape == (0, 2)


def test_empty_string_is_a_normal_prediction(clf):
    (prediction,) = clf([""])
    assert prediction["label"] in {"NEGATIVE", "POSITIVE"} and 0.5 <= prediction["score"] <= 1


def test_single_string_is_a_list_of_one(clf):
    assert clf("the film was great") == clf(["the film was great"])


@pytest.mark.parametrize("bad, index, type_name", [([None], 0, "NoneType"), (["ok", 3], 1, "int"), (["a", "b", b"c"], 2, "bytes")])
def test_non_string_input_names_its_position_and_type(clf, bad, index, type_name):
    with pytest.raises(TypeError, match=f"input {index} is {type_name}, expected str"):
        clf(bad)


def test_text_that_is_not_unicode_names_its_position(clf):
    with pytest.raises(ValueError, match=r"input 1 is not Unicode text: a lone surrogate '\\udce9' at character 3"):
        clf(["fine", "caf\udce9"])  # b"caf\xe9" decoded with errors="surrogateescape"


def test_cli_reads_a_json_file_that_starts_with_a_byte_order_mark(clf, tiny_model_dir, tmp_path):
    texts = ["a fine film", "awful , boring", "the film was great"]
    path = tmp_path / "request.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"input_data": texts}).encode())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "flaxsst.predict", "--model", str(tiny_model_dir), "--input", str(path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [p["label"] for p in json.loads(result.stdout)] == [p["label"] for p in clf(texts)]


def test_none_alone_is_a_type_error(clf):
    with pytest.raises(TypeError, match="expected a string or a list of strings, got NoneType"):
        clf(None)
    with pytest.raises(TypeError, match="got bytes: decode it to str first"):
        clf(b"the film was great")


def test_very_long_text_is_truncated_not_an_error(clf, hf_pipeline):
    text = "the film was great and " * 5000
    (ours,) = clf([text])
    (reference,) = hf_pipeline([text], truncation=True, max_length=64)
    assert ours["label"] == reference["label"]
    assert ours["score"] == pytest.approx(reference["score"], abs=1e-5)


def _cli(model_dir, stdin):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flaxsst.predict", "--model", str(model_dir)],
                          input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_cli_reads_the_endpoint_json_request(clf, tiny_model_dir):
    texts = ["Today was an amazing day!", "It was an unfortunate series of events."]
    result = _cli(tiny_model_dir, json.dumps({"input_data": texts}))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert [p["label"] for p in got] == [p["label"] for p in clf(texts)]


def test_cli_reads_one_text_per_line(clf, tiny_model_dir):
    result = _cli(tiny_model_dir, "the film was great\nawful , boring\n")
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(got) == 2 and [p["label"] for p in got] == [p["label"] for p in clf(["the film was great", "awful , boring"])]


def test_cli_rejects_a_bad_request_with_a_message(tiny_model_dir):
    result = _cli(tiny_model_dir, json.dumps({"inputs": ["x"]}))
    assert result.returncode == 2 and "input_data" in result.stderr
    result = _cli(tiny_model_dir, json.dumps({"input_data": ["x", None]}))
    assert result.returncode == 2 and "input 1 is NoneType" in result.stderr


def test_progress_bar_over_batches_when_asked(clf, capsys):
    texts = ["the film was great"] * 9
    assert clf(texts, progress=True) == clf(texts, progress=False)
    assert "predict" in capsys.readouterr().err


def test_a_script_beside_a_folder_named_flaxsst_imports_the_package(tmp_path):
    """The README's editable install (``editable_mode=compat``) puts the clone on ``sys.path``, so the
    real package wins over a same-named folder beside the script (a namespace package otherwise)."""
    (tmp_path / "flaxsst").mkdir()
    (tmp_path / "script.py").write_text("from flaxsst import Classifier\nprint(Classifier.__module__)\n")
    result = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "flaxsst.classifier"
