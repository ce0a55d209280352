"""bench.cpu_peers' bookkeeping: the fair batches every peer gets, the turns the latencies take, and the
per-length medians, against values worked by hand."""

import numpy as np

from bench.cpu_peers import by_tokens, fair_batches, latency_figures, latency_in_turns


def test_fair_batches_sort_by_length_and_pad_each_batch_to_its_own_longest():
    ids = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    batches = list(fair_batches(ids, 2))
    assert [list(chunk) for chunk, _, _ in batches] == [[1, 3], [0, 2]]
    (_, first, first_mask), (_, second, second_mask) = batches
    assert first.tolist() == [[4, 0], [10, 11]] and first_mask.tolist() == [[1, 0], [1, 1]]
    assert second.tolist() == [[1, 2, 3, 0, 0], [5, 6, 7, 8, 9]]
    assert second_mask.sum(1).tolist() == [3, 5] and second.dtype == np.int64


def test_latency_runners_take_turns_over_every_text_after_an_untimed_pass():
    calls = []
    runs = {name: (lambda text, name=name: calls.append((name, text))) for name in ("a", "b")}
    times = latency_in_turns(runs, ["x", "y"], rounds=2)
    untimed = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert calls == untimed * 3  # the untimed pass, then two rounds with the runners in turn
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 4, "b": 4}


def test_latency_figures_and_medians_by_token_bucket():
    seconds = [0.001, 0.003, 0.010, 0.002, 0.004, 0.020]  # two rounds over three texts
    tokens = [5, 9, 12]  # buckets 0, 8, 8
    assert by_tokens(seconds, tokens) == {0: 1.5, 8: 7.0}  # medians of (1, 2) and (3, 10, 4, 20) ms
    figures = latency_figures(seconds)
    assert figures["median_ms"] == 3.5 and figures["mean_ms"] == 6.67
    assert figures["p99_ms"] == round(1000 * float(np.percentile(seconds, 99)), 2)
