"""Candidate ``Classifier`` call paths, timed against the product's by ``bench.throughput --classifier``;
one moves into ``flaxsst.classifier`` only when the GPU numbers support it (bench/RESULTS.md).

- ``packed``: one host-to-device copy per batch instead of two: the ids and each row's
  length travel as one int32 array ``[rows, length + 1]`` and the attention mask is
  rebuilt on the device (``arange(length) < row_length``, the same 0/1 mask ``pad_right``
  writes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.classifier import Classifier
from flaxsst.model import DistilBertForSequenceClassification


class PackedClassifier(Classifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = DistilBertForSequenceClassification(self.config, self.precision)

        def forward(params, packed):
            length = packed.shape[1] - 1
            mask = (jnp.arange(length)[None, :] < packed[:, length:]).astype(jnp.int32)
            return model.apply({"params": params}, packed[:, :length], mask, deterministic=True)

        self.packed_forward = jax.jit(forward)

    def forward_batch(self, ids, rows, length):
        packed = np.full((rows, length + 1), self.tokenizer.pad_id, np.int32)
        packed[:, length] = 0
        for row, seq in enumerate(ids):
            packed[row, : len(seq)] = seq
            packed[row, length] = len(seq)
        return self.packed_forward(self.params, packed)
