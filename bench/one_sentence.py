"""Where one sentence's time goes in ``Classifier.logits([text])``, float32 and int8, DistilBERT-base.

    python -m bench.one_sentence --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english

Stages, each the median of ``--calls`` calls, the stages and dtypes taking turns for ``--rounds`` rounds:
the whole call (text in, logits out); tokenization (``encode``); the batch to the device and back
(``forward_batch``: padding, the compiled program, the fetch); the program's 36 dense dots alone at the same
rows (``bench.dense_dots``' chain: 6 layers of q, k, v, out, lin1, lin2; the classifier's last block runs 4 of
its 6 on one row, so this slightly overstates them); and the floor of a call into any compiled program (a
trivial one on the same ids). Derived: the program apart from its dense dots (attention, layer norms, GELU,
embeddings) and the call apart from the program (Python, tokenization, softmax). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.cpu_peers import ONE_SENTENCE, cpu_facts, random_model_dir
from bench.dense_dots import SHAPES, chain


def median_ms(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--text", default=ONE_SENTENCE)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    from flaxsst import Classifier, int8, packed_dot
    from flaxsst.tokenizer import pad_right

    work, _ = random_model_dir(args.tokenizer_dir, "one_sentence_")
    rng = np.random.default_rng(0)
    layers = [{name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in SHAPES.items()}
              for _ in range(6)]
    lanes = packed_dot.load()
    stages = {}
    facts = {}
    for dtype in ("float32", "int8"):
        clf = Classifier.from_pretrained(work, dtype=dtype)
        ids = clf.encode([args.text])
        batch = clf.shapes.plan([len(ids[0])])[0]
        facts[dtype] = {"tokens": len(ids[0]), "rows": batch.rows, "length": batch.length,
                        "packed_lanes": clf.packed_lanes, "int8_lanes": clf.int8_lanes}
        if clf.int8_lanes:
            weights = [{name: int8.prepare(w, lanes) for name, w in layer.items()} for layer in layers]
            dots = jax.jit(chain(lambda x, w: int8.int8_dot(x, *w)))
        elif clf.packed_lanes:
            weights = [{name: packed_dot.pack(w, lanes) for name, w in layer.items()} for layer in layers]
            dots = jax.jit(chain(lambda x, w: packed_dot.packed_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))))
        else:
            weights, dots = layers, jax.jit(chain(jnp.matmul))
        weights = jax.device_put(weights)
        x = jax.device_put(rng.standard_normal((batch.rows * batch.length, 768)).astype(np.float32))
        padded = pad_right(ids, batch.rows, batch.length, clf.tokenizer.pad_id)
        trivial = jax.jit(lambda a, b: (a + b)[:, :2].astype(jnp.float32))
        stages[dtype] = {
            "call": lambda clf=clf: clf.logits([args.text]),
            "encode": lambda clf=clf: clf.encode([args.text]),
            "forward_batch": lambda clf=clf, ids=ids, batch=batch: np.asarray(clf.forward_batch(ids, batch.rows, batch.length)),
            "dense_dots": lambda dots=dots, weights=weights, x=x: np.asarray(dots(weights, x)),
            "any_program": lambda trivial=trivial, padded=padded: np.asarray(trivial(*padded)),
        }
        for fn in stages[dtype].values():  # compile and warm
            for _ in range(3):
                fn()
    times = {dtype: {name: [] for name in fns} for dtype, fns in stages.items()}
    for _ in range(args.rounds):
        for dtype, fns in stages.items():
            for name, fn in fns.items():
                times[dtype][name] += median_ms(fn, max(1, args.calls // args.rounds))
    print(json.dumps({"what": "meta", "date": time.strftime("%Y-%m-%d"), **cpu_facts(), "jax": jax.__version__,
                      "text": args.text}), flush=True)
    for dtype, named in times.items():
        med = {name: round(float(np.median(t)), 3) for name, t in named.items()}
        print(json.dumps({"what": "one_sentence", "dtype": dtype, **facts[dtype], "median_ms": med,
                          "program_apart_from_dense_dots_ms": round(med["forward_batch"] - med["dense_dots"], 3),
                          "call_apart_from_forward_batch_ms": round(med["call"] - med["forward_batch"], 3)}), flush=True)


if __name__ == "__main__":
    main()
