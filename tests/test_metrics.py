"""Evaluation counts every example once on 8 devices; metrics equal scikit-learn's."""

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from flaxsst.config import ModelConfig
from flaxsst.data import TokenizedSplit
from flaxsst.metrics import classification_metrics, format_table, roc_auc
from flaxsst.model import DistilBertForSequenceClassification, init_params
from flaxsst.evaluation import predict_split
from flaxsst.param_groups import ParamGroups
from flaxsst.parallel import pmap_eval_step, replicate


def _sklearn(labels, logits):
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    predictions = probs.argmax(-1)
    return {
        "accuracy": skm.accuracy_score(labels, predictions),
        "precision": skm.precision_score(labels, predictions),
        "recall": skm.recall_score(labels, predictions),
        "f1": skm.f1_score(labels, predictions),
        "auc": skm.roc_auc_score(labels, probs[:, 1]),
        "loss": skm.log_loss(labels, probs, labels=[0, 1]),
        "confusion_matrix": skm.confusion_matrix(labels, predictions).tolist(),
    }


def _assert_matches_sklearn(labels, logits):
    ours = classification_metrics(labels, logits)
    expected = _sklearn(labels, logits)
    for key in ("accuracy", "precision", "recall", "f1", "auc", "loss"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    assert ours["confusion_matrix"] == expected["confusion_matrix"]
    assert ours["num_examples"] == len(labels)


def test_eval_on_8_devices_counts_all_872_examples_once_and_metrics_equal_sklearn():
    assert jax.device_count() == 8
    config = ModelConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    params = init_params(config, 1)
    rng = np.random.default_rng(0)
    token_ids = [np.concatenate([[2], rng.integers(5, 200, int(n)), [3]]).astype(np.int32) for n in rng.integers(1, 40, 872)]
    labels = rng.integers(0, 2, 872).astype(np.int32)
    split = TokenizedSplit("validation", "random", token_ids, labels)
    model = DistilBertForSequenceClassification(config)
    groups = ParamGroups(params)
    logits, losses = predict_split(pmap_eval_step(model, groups), replicate(groups.pack(params)), split, batch_size=100,
                                   buckets=[16, 32, 64], max_seq_length=64, pad_id=0)
    assert logits.shape == (872, 2) and losses.shape == (872,)
    for i in (0, 1, 95, 96, 500, 871):  # each row is its own example, in order
        alone = model.apply({"params": params}, token_ids[i][None], np.ones((1, len(token_ids[i])), np.int32))
        np.testing.assert_allclose(logits[i], np.asarray(alone)[0], atol=1e-5)
    _assert_matches_sklearn(labels, logits)
    assert classification_metrics(labels, logits)["loss"] == pytest.approx(float(losses.mean()), abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    logits = rng.normal(size=(300, 2)) + labels[:, None] * np.array([0, 0.8])
    logits[:40] = np.round(logits[:40], 1)  # ties in the scores
    _assert_matches_sklearn(labels, logits)


def test_auc_with_ties_worked_by_hand():
    # positives scored 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5), (0.8>0.2), (0.5=0.5 -> 1/2), (0.5>0.2) = 3.5/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.2])) == pytest.approx(0.875)


def test_table_names_labels():
    table = format_table(classification_metrics(np.array([0, 1, 1]), np.array([[2.0, 0], [0, 2.0], [2.0, 0]])),
                         {0: "NEGATIVE", 1: "POSITIVE"})
    assert "accuracy" in table and "NEGATIVE" in table and "POSITIVE" in table
