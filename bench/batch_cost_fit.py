"""The cost model of ``flaxsst.batching`` fitted: a ``Classifier``'s compiled program timed at rows x lengths,
one text a row and packed (``forward_batch``, ``forward_packed``), then ``ms = call + token x tokens + attention
x tokens x length`` fitted by least squares on relative error.

    python -m bench.batch_cost_fit --model /tmp/distilbert-random [--dtype int8]

Prints a JSON line per shape and one per fit (``call_tokens`` and ``attention_per_length``: the model's units).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a HF export (bench.serve_load --make-model makes one)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 24])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--tokens-timed", type=int, default=2000, help="about this many tokens timed a shape")
    args = parser.parse_args()
    from flaxsst import Classifier
    from flaxsst.batching import PackedBatch

    packed = Classifier.from_pretrained(args.model, dtype=args.dtype, pack=True)
    plain = Classifier.from_pretrained(args.model, dtype=args.dtype)
    rng = np.random.default_rng(0)

    def median_ms(fn, calls):
        fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
        return float(np.median(times))

    measured = []
    for length in args.lengths:
        for rows in args.rows:
            ids = [[101, *rng.integers(1000, 20000, length - 2).tolist(), 102] for _ in range(rows)]
            batch = PackedBatch(np.arange(rows), rows, length, np.arange(rows), np.zeros(rows, np.int64),
                                np.zeros(rows, np.int64))
            calls = max(3, args.tokens_timed // (rows * length))
            times = {"packed": median_ms(lambda: np.asarray(packed.forward_packed(ids, batch)), calls),
                     "one_a_row": median_ms(lambda: np.asarray(plain.forward_batch(ids, rows, length)), calls)}
            measured.append((rows, length, times))
            print(json.dumps({"dtype": args.dtype, "rows": rows, "length": length,
                              **{f"{kind}_ms": round(ms, 2) for kind, ms in times.items()}}), flush=True)
    terms = np.array([[1, rows * length, rows * length * length] for rows, length, _ in measured], float)
    for kind in ("packed", "one_a_row"):
        ms = np.array([times[kind] for _, _, times in measured])
        weights = 1 / ms
        call, token, attention = np.linalg.lstsq(terms * weights[:, None], ms * weights, rcond=None)[0]
        worst = float(np.max(np.abs(terms @ [call, token, attention] - ms) / ms))
        print(json.dumps({"dtype": args.dtype, "fit": kind, "call_ms": round(call, 3), "token_ms": round(token, 5),
                          "attention_ms": round(attention, 7), "call_tokens": round(call / token, 1),
                          "attention_per_length": round(attention / token, 5), "worst_relative_error": round(worst, 3)}))


if __name__ == "__main__":
    main()
