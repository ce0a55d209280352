"""Candidate ``Classifier`` call paths, timed against the product's by ``bench/throughput.py --classifier``;
one moves into ``flaxsst.predict`` only when the GPU numbers support it (bench/RESULTS.md).

- ``packed``: one host-to-device copy per batch instead of two: the ids and each row's
  length travel as one int32 array ``[rows, length + 1]`` and the attention mask is
  rebuilt on the device (``arange(length) < row_length``, the same 0/1 mask ``pad_right``
  writes); the device returns the probabilities, so the host does no softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.data import pick_length
from flaxsst.model import DistilBertForSequenceClassification
from flaxsst.predict import Classifier, validate_texts


class PackedClassifier(Classifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = DistilBertForSequenceClassification(self.config)

        def forward(params, packed):
            length = packed.shape[1] - 1
            ids = packed[:, :length]
            mask = (jnp.arange(length)[None, :] < packed[:, length:]).astype(jnp.int32)
            logits = model.apply({"params": params}, ids, mask, deterministic=True)
            return jax.nn.softmax(logits, axis=-1)

        self._packed_forward = jax.jit(forward)

    def probabilities(self, texts) -> np.ndarray:
        texts = validate_texts(texts)
        out = np.zeros((len(texts), self.config.num_labels), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer.encode(texts)
        order = np.argsort([len(seq) for seq in ids], kind="stable")
        pending = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = pick_length(max(len(ids[i]) for i in chunk), self.buckets, self.max_length)
            packed = np.full((self._row_count(len(chunk)), length + 1), self.tokenizer.pad_id, np.int32)
            packed[:, length] = 0
            for row, i in enumerate(chunk):
                seq = ids[i]
                packed[row, :len(seq)] = seq
                packed[row, length] = len(seq)
            pending.append((chunk, self._packed_forward(self.params, packed)))
        for chunk, probs in pending:
            out[chunk] = np.asarray(probs)[:len(chunk)]
        return out

    def __call__(self, texts, progress=None):
        probs = self.probabilities(texts)
        best = probs.argmax(axis=-1)
        return [{"label": self.config.id2label[int(label)], "score": float(probs[row, label])}
                for row, label in enumerate(best)]
