"""Batch shapes: every text in exactly one batch, padded to the shortest allowed length that holds it."""

import numpy as np
import pytest

from flaxsst.batching import (CPU_ATTENTION_PER_LENGTH, CPU_CALL_TOKENS, BatchShapes, first_fit_rows, least_cost_cuts,
                              multiples, octave_steps, packing_cost, packing_groups, powers_of_two, serving_lengths,
                              slots)
from flaxsst.errors import ConfigError


def test_cpu_batches_pad_by_under_an_eighth_and_split_short_batches_into_powers_of_two():
    shapes = BatchShapes.for_backend("cpu", 128, batch_size=4)
    lengths = [9, 2, 31, 5, 5, 17, 100]  # sorted: 2 5 5 9 | 17 31 100
    batches = shapes.plan(lengths)
    got = [(sorted(b.indices.tolist()), b.rows, b.length) for b in batches]
    # worked by hand: 2, 5, 5, 9 tokens take length 9 (every length up to 16); the last three split
    # 2 + 1: 31 pads to 32 (steps of 2 up to 32), 100 to 104 (steps of 8 from 64)
    assert got == [([0, 1, 3, 4], 4, 9), ([2, 5], 2, 32), ([6], 1, 104)]
    assert BatchShapes.for_backend("cpu", 128).batch_size == 24


def test_warm_cpu_batches_are_cut_where_the_work_is_least():
    shapes = BatchShapes.for_backend("cpu", 128, batch_size=4)
    batches = shapes.plan([9, 2, 31, 5, 5, 17, 100], least_cost=True)  # sorted: 2 5 5 9 | 17 31 | 100
    got = [(sorted(b.indices.tolist()), b.rows, b.length) for b in batches]
    # worked by hand: apart, 17 and 31 cost 18 x 1.009 + 24 + 32 x 1.016 + 24 = 98.7 padded tokens;
    # together in 2 rows of 32, 64 x 1.016 + 24 = 89.0; 31 and 100 together, 2 x 104 x 1.052 + 24 = 242.8,
    # against 32 x 1.016 + 24 + 104 x 1.052 + 24 = 189.9 apart
    assert got == [([0, 1, 3, 4], 4, 9), ([2, 5], 2, 32), ([6], 1, 104)]
    # seven texts of 2 tokens and one of 60: cut every 4 texts, three short ones would pad to 60
    batches = shapes.plan([2] * 7 + [60], least_cost=True)
    assert sorted((b.rows, b.length) for b in batches) == [(1, 2), (1, 60), (2, 2), (4, 2)]
    assert [(b.rows, b.length) for b in shapes.plan([2] * 7 + [60])] == [(4, 2), (4, 60)]


def test_least_cost_cuts_equal_a_search_of_every_cut():
    rng = np.random.default_rng(3)
    for _ in range(40):
        padded = sorted(rng.choice([4, 9, 16, 18, 32, 64, 104], size=rng.integers(1, 10)).tolist())
        row_counts = [1, 2, 4, 6]

        def cost(cuts):
            return sum((end - start) * padded[end - 1] * (1 + CPU_ATTENTION_PER_LENGTH * padded[end - 1])
                       + CPU_CALL_TOKENS for start, end in cuts)

        def every(start):  # every way to cover padded[start:] with runs of row_counts texts
            if start == len(padded):
                yield []
            for rows in row_counts:
                if start + rows <= len(padded):
                    for rest in every(start + rows):
                        yield [(start, start + rows), *rest]

        cheapest = min(cost(cuts) for cuts in every(0))
        assert cost(least_cost_cuts(padded, row_counts)) == pytest.approx(cheapest)


def test_every_text_is_in_exactly_one_batch_that_holds_it():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, 1000).tolist()
    for backend in ("cpu", "gpu"):
        shapes = BatchShapes.for_backend(backend, 64, batch_size=24)
        for least_cost in (False, True):
            check_plan(shapes, lengths, shapes.plan(lengths, least_cost), backend)


def check_plan(shapes, lengths, batches, backend):
    seen = np.concatenate([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b.indices) <= b.rows <= 24 and (b.rows, b.length) in shapes.programs()
        assert max(lengths[i] for i in b.indices) <= b.length
        if backend == "cpu":
            longest = max(lengths[i] for i in b.indices)
            assert b.rows == len(b.indices) and b.length - longest < max(1, longest / 8)


def test_first_fit_places_the_longest_first_each_in_the_first_row_with_room():
    # worked by hand, rows of 12 tokens: 9 opens row 0 (3 left), 7 row 1 (5 left), 5 fills row 1 from 7,
    # 4 opens row 2, 3 fills row 0 from 9
    assert first_fit_rows([5, 9, 3, 7, 4], 12, most=3) == [[(1, 0), (2, 9)], [(3, 0), (0, 7)], [(4, 0)]]
    # at most one text a row: each its own
    assert first_fit_rows([5, 9, 3], 12, most=1) == [[(1, 0)], [(0, 0)], [(2, 0)]]


def test_packing_groups_equal_a_search_of_every_grouping():
    rng = np.random.default_rng(5)
    shapes = BatchShapes.for_backend("cpu", 128, batch_size=8, lengths=[16, 24, 32, 48, 64, 128])
    for _ in range(40):
        lengths = np.sort(rng.integers(2, 129, size=rng.integers(1, 12)))
        padded = [shapes.padded_length(int(n)) for n in lengths]
        ends = [e for e in range(1, len(padded) + 1) if e == len(padded) or padded[e] != padded[e - 1]]

        def cost(runs):
            total = 0.0
            for start, end in runs:
                length = padded[end - 1]
                group = lengths[start:end]
                total += packing_cost(int(group.sum()), len(group), int((2 * group > length).sum()), length,
                                      shapes.row_counts())
            return total

        def every(start):  # every way to cover lengths[start:] with runs that end where a padded length does
            if start == len(padded):
                yield []
            for end in ends:
                if end > start:
                    for rest in every(end):
                        yield [(start, end), *rest]

        assert cost(packing_groups(lengths, padded, shapes.row_counts())) == pytest.approx(min(map(cost, every(0))))


def test_packed_rows_hold_every_text_once_apart_and_pad_less_than_a_row_each():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, 1000)
    shapes = BatchShapes.for_backend("cpu", 64, batch_size=24)
    batches = shapes.pack(lengths)
    assert sorted(np.concatenate([b.indices for b in batches]).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert (b.rows, b.length) in shapes.programs()
        for row in range(b.rows):
            mine = np.flatnonzero(b.row == row)
            assert 1 <= len(mine) <= slots(b.length) and sorted(b.slot[mine].tolist()) == list(range(len(mine)))
            spans = sorted((int(b.start[i]), int(b.start[i] + lengths[b.indices[i]])) for i in mine)
            assert spans[0][0] >= 0 and spans[-1][1] <= b.length
            assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert sum(b.rows * b.length for b in batches) < 1.04 * lengths.sum()
    # a server's batch, drawn at random: a text a row pads 15-18% with the serving lengths, packed 5-13%
    served = BatchShapes.for_backend("cpu", 128, lengths=serving_lengths("cpu", 128))
    for seed in range(5):
        drawn = np.random.default_rng(seed).integers(5, 60, 60)
        packed = sum(b.rows * b.length for b in served.pack(drawn))
        assert packed < 0.97 * sum(b.rows * b.length for b in served.plan(drawn, least_cost=True))
    one = shapes.pack([5])
    assert [(b.rows, b.length, b.start.tolist(), b.slot.tolist()) for b in one] == [(1, 5, [0], [0])]


def test_accelerator_batches_keep_powers_of_two_lengths_and_padded_rows():
    shapes = BatchShapes.for_backend("gpu", 128)
    assert shapes.batch_size == 128 and shapes.lengths == (16, 32, 64, 128) and not shapes.split_rows
    (batch,) = shapes.plan([20, 3, 7])
    assert batch.rows == 4 and batch.length == 32


def test_shape_sets_and_bad_settings():
    assert multiples(4, 10) == (4, 8, 10) and powers_of_two(16, 100) == (16, 32, 64, 100)
    assert octave_steps(8, 40) == (*range(2, 17), 18, 20, 22, 24, 26, 28, 30, 32, 36, 40)
    assert octave_steps(4, 20) == (*range(2, 8), 8, 10, 12, 14, 16, 20) and octave_steps(8, 2) == (2,)
    assert BatchShapes.for_backend("cpu", 16, length_step=4).lengths == (4, 8, 12, 16)
    assert BatchShapes.for_backend("cpu", 16, batch_size=4).row_counts() == [1, 2, 4]
    assert BatchShapes.for_backend("cpu", 16, batch_size=6).row_counts() == [1, 2, 4, 6]
    with pytest.raises(ConfigError, match="batch_size=0 must be at least 1"):
        BatchShapes.for_backend("cpu", 16, batch_size=0)
    with pytest.raises(ConfigError, match="length_step=0"):
        BatchShapes.for_backend("cpu", 16, length_step=0)


def test_given_lengths_are_sorted_end_at_max_length_and_out_of_range_ones_are_refused():
    from flaxsst.batching import BatchShapes, serving_lengths
    from flaxsst.errors import ConfigError

    assert BatchShapes.for_backend("cpu", 128, lengths=[32, 16]).lengths == (16, 32, 128)
    assert BatchShapes.for_backend("cpu", 64, lengths=serving_lengths("cpu", 64)).lengths == (16, 20, 24, 28, 32, 40,
                                                                                                48, 64)
    assert serving_lengths("cpu", 128) == (16, 20, 24, 28, 32, 40, 48, 64, 96, 128)
    for bad in ([], [0, 16], [16, 1000]):
        with pytest.raises(ConfigError, match="expected padded lengths from 1 to max_length=128"):
            BatchShapes.for_backend("cpu", 128, lengths=bad)
