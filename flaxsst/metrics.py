"""Classification metrics of the model card: accuracy, precision, recall, F1, ROC AUC, loss, confusion matrix.

Binary metrics take label 1 (POSITIVE) as the positive class, as scikit-learn does.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with tied scores given average ranks."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(sorted_scores):
        end = start
        while end + 1 < len(sorted_scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, logits: np.ndarray, num_labels: int | None = None) -> dict:
    """``labels [n]``, ``logits [n, num_labels]`` -> the metric dict written to ``eval_results.json``."""
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    num_labels = num_labels or logits.shape[-1]
    probs = softmax(logits)
    predictions = probs.argmax(axis=-1)
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    log_probs = np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
    true_pos = confusion[1, 1] if num_labels >= 2 else 0
    predicted_pos = confusion[:, 1].sum() if num_labels >= 2 else 0
    actual_pos = confusion[1, :].sum() if num_labels >= 2 else 0
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((predictions == labels).mean()) if len(labels) else float("nan"),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc": roc_auc(labels == 1, probs[:, 1]) if num_labels == 2 else float("nan"),
        "loss": float(-log_probs.mean()) if len(labels) else float("nan"),
        "confusion_matrix": confusion.tolist(),
        "num_examples": int(len(labels)),
    }


def format_table(metrics: dict, id2label: dict[int, str] | None = None) -> str:
    """The metrics and the confusion matrix as a plain-text table."""
    lines = [f"{'metric':<12}{'value':>10}"]
    for key in ("accuracy", "precision", "recall", "f1", "auc", "loss"):
        lines.append(f"{key:<12}{metrics[key]:>10.4f}")
    lines.append(f"{'examples':<12}{metrics['num_examples']:>10d}")
    confusion = metrics["confusion_matrix"]
    names = [id2label.get(i, str(i)) if id2label else str(i) for i in range(len(confusion))]
    width = max(10, *(len(n) + 2 for n in names))
    lines.append("")
    lines.append("confusion (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, confusion):
        lines.append(f"{name:<{width}}" + "".join(f"{c:>{width}d}" for c in row))
    return "\n".join(lines)
