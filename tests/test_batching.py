"""Batch shapes: every text in exactly one batch, padded to the shortest allowed length that holds it."""

import numpy as np
import pytest

from flaxsst.batching import BatchShapes, multiples, powers_of_two
from flaxsst.errors import ConfigError


def test_cpu_batches_pad_to_a_multiple_of_four_and_split_short_batches_into_powers_of_two():
    shapes = BatchShapes.for_backend("cpu", 128, batch_size=4)
    lengths = [9, 2, 30, 5, 5, 17, 128]  # sorted: 2 5 5 9 | 17 30 128
    batches = shapes.plan(lengths)
    got = [(sorted(b.indices.tolist()), b.rows, b.length) for b in batches]
    # worked by hand: the first four (2, 5, 5, 9 tokens) pad to 12; the last three split 2 + 1
    assert got == [([0, 1, 3, 4], 4, 12), ([2, 5], 2, 32), ([6], 1, 128)]


def test_every_text_is_in_exactly_one_batch_that_holds_it():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, 1000).tolist()
    for backend in ("cpu", "gpu"):
        shapes = BatchShapes.for_backend(backend, 64, batch_size=24)
        batches = shapes.plan(lengths)
        seen = np.concatenate([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(1000))
        for b in batches:
            assert len(b.indices) <= b.rows <= 24 and (b.rows, b.length) in shapes.programs()
            assert max(lengths[i] for i in b.indices) <= b.length
            if backend == "cpu":
                assert b.rows == len(b.indices) and b.length - max(lengths[i] for i in b.indices) < 4


def test_accelerator_batches_keep_powers_of_two_lengths_and_padded_rows():
    shapes = BatchShapes.for_backend("gpu", 128)
    assert shapes.batch_size == 128 and shapes.lengths == (16, 32, 64, 128) and not shapes.split_rows
    (batch,) = shapes.plan([20, 3, 7])
    assert batch.rows == 4 and batch.length == 32


def test_shape_sets_and_bad_settings():
    assert multiples(4, 10) == (4, 8, 10) and powers_of_two(16, 100) == (16, 32, 64, 100)
    assert BatchShapes.for_backend("cpu", 16, batch_size=4).row_counts() == [1, 2, 4]
    assert BatchShapes.for_backend("cpu", 16, batch_size=6).row_counts() == [1, 2, 4, 6]
    with pytest.raises(ConfigError, match="batch_size=0 must be at least 1"):
        BatchShapes.for_backend("cpu", 16, batch_size=0)
    with pytest.raises(ConfigError, match="length_step=0"):
        BatchShapes.for_backend("cpu", 16, length_step=0)
