"""``flaxsst.ray.ClassifierPredictor``, called as Ray Data calls it, against ``Classifier`` and a softmax
worked with numpy; the Ray jobs themselves are in ``tests/test_bulk.py``."""

import math

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="the ray extra (pip install -e '.[ray]') brings pyarrow")
pd = pytest.importorskip("pandas")

from flaxsst.classifier import Classifier  # noqa: E402
from flaxsst.ray import ClassifierPredictor, cell_error  # noqa: E402
from tests.serving import texts_of  # noqa: E402

BAD = {1: None, 3: "", 4: "   ", 6: 5, 8: float("nan"), 9: b"bytes", 11: "lone \ud800 surrogate"}


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return ClassifierPredictor(tiny_model_dir, max_length=16, batch_size=4, all_scores=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Classifier.from_pretrained(tiny_model_dir, max_length=16, batch_size=4)


def cells():
    texts = texts_of(7, 14)
    return [BAD.get(i, text) for i, text in enumerate(texts)]


def check(out, texts, ids, reference):
    assert out.column_names == ["id", "text", "label", "score", "score_NEGATIVE", "score_POSITIVE", "error"]
    assert out.column("id").to_pylist() == list(ids)
    assert out.schema.field("label").type == pa.string() and out.schema.field("score").type == pa.float64()
    good = [i for i in range(len(texts)) if i not in BAD]
    logits = reference.logits([texts[i] for i in good])
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    labels, scores, errors = (out.column(name).to_pylist() for name in ("label", "score", "error"))
    for row, i in enumerate(good):
        best = int(probs[row].argmax())
        assert labels[i] == ["NEGATIVE", "POSITIVE"][best] and errors[i] is None
        assert scores[i] == pytest.approx(probs[row, best], abs=1e-6)
        assert out.column("score_POSITIVE")[i].as_py() == pytest.approx(probs[row, 1], abs=1e-6)
    for i in BAD:
        assert labels[i] is None and scores[i] is None and out.column("score_NEGATIVE")[i].as_py() is None
        assert errors[i] == cell_error(texts[i]) and errors[i].startswith("text is")


def test_an_arrow_batch_keeps_its_columns_and_gains_the_classifiers_answers(predictor, reference):
    texts = cells()
    ids = range(100, 100 + len(texts))
    arrow_cells = [t if t is None or (isinstance(t, str) and "\ud800" not in t) else None for t in texts]
    table = pa.table({"id": list(ids), "text": pa.array(arrow_cells, pa.string())})
    arrow_texts = table.column("text").to_pylist()
    out = predictor(table)
    good = [i for i, t in enumerate(arrow_texts) if cell_error(t) is None]
    assert out.column("label").null_count == len(texts) - len(good)
    np.testing.assert_array_equal(np.argmax(reference.logits([arrow_texts[i] for i in good]), axis=1),
                                  [["NEGATIVE", "POSITIVE"].index(out.column("label")[i].as_py()) for i in good])


def test_numpy_and_pandas_batches_with_bad_cells_score_the_rest(predictor, reference):
    texts = cells()
    ids = np.arange(len(texts)) * 3
    check(predictor({"id": ids, "text": np.array(texts, dtype=object)}), texts, ids, reference)
    check(predictor(pd.DataFrame({"id": ids, "text": pd.Series(texts, dtype=object)})), texts, ids, reference)


def test_the_error_values_say_why():
    assert cell_error(None) == "text is missing" and cell_error(math.nan) == "text is missing"
    assert cell_error("") == "text is empty" and cell_error(" \n") == "text is empty"
    assert cell_error(3) == "text is int, expected str" and cell_error(b"x") == "text is bytes, expected str"
    assert "lone surrogate" in cell_error("a\udcff") and cell_error("fine") is None


def test_a_batch_of_only_bad_cells_is_answered_without_the_model(predictor):
    out = predictor({"text": np.array([None, ""], dtype=object)})
    assert out.column("error").to_pylist() == ["text is missing", "text is empty"]
    assert out.column("label").type == pa.string() and out.column("score").type == pa.float64()


def test_a_missing_text_column_or_a_clashing_output_column_is_named(predictor):
    with pytest.raises(ValueError, match=r"text column 'text' is not in the data \(its columns: sentence\)"):
        predictor({"sentence": np.array(["a"])})
    with pytest.raises(ValueError, match="column 'label' is in the data already"):
        predictor({"text": np.array(["a"]), "label": np.array([1])})
