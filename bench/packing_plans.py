"""Padding and estimated cost of a server's batches, one text a row (``BatchShapes.plan`` with the least-cost
cuts) against several texts a row (``BatchShapes.pack``): SST-2 dev sentences drawn at random, the server's
lengths (``serving_lengths``).

    python -m bench.packing_plans --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english \\
        --texts ../shared/data/sst2/dev.tsv

Prints a JSON line per batch size and plan: padded tokens over real ones, the cost model's estimate over real
tokens, calls a batch, and the planning time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--texts", required=True, help="a GLUE .tsv (its sentence column)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 24, 69, 120])
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    from flaxsst.batching import CPU_CALL_TOKENS, BatchShapes, serving_lengths
    from flaxsst.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(args.tokenizer_dir, 128)
    rows = open(args.texts, encoding="utf-8").read().splitlines()[1:]
    lengths = np.array([len(ids) for ids in tok.encode([row.split("\t")[0] for row in rows])])
    shapes = BatchShapes.for_backend("cpu", 128, lengths=serving_lengths("cpu", 128))
    rng = np.random.default_rng(0)

    def cost(batch):
        return batch.rows * batch.length * (1 + shapes.attention_per_length * batch.length) + CPU_CALL_TOKENS

    for size in args.sizes:
        totals = {"one_a_row": np.zeros(4), "packed": np.zeros(4)}
        real = 0
        for _ in range(args.draws):
            drawn = rng.choice(lengths, size)
            real += int(drawn.sum())
            for kind, plan in (("one_a_row", lambda: shapes.plan(drawn, least_cost=True)),
                               ("packed", lambda: shapes.pack(drawn))):
                start = time.perf_counter()
                batches = plan()
                seconds = time.perf_counter() - start
                totals[kind] += [sum(b.rows * b.length for b in batches), sum(map(cost, batches)), len(batches),
                                 seconds]
        for kind, (padded, estimate, calls, seconds) in totals.items():
            print(json.dumps({"texts": size, "plan": kind, "padded_over_real": round(padded / real, 3),
                              "cost_over_real": round(estimate / real, 3), "calls": round(calls / args.draws, 1),
                              "plan_ms": round(1000 * seconds / args.draws, 2)}))


if __name__ == "__main__":
    main()
