"""The [CLS]-only last block against the last block over every position, in one process, interleaved.

    python -m bench.cpu_lastblock_ab --texts ../shared/data/sst2/dev.tsv --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english

``Classifier`` on the 872 SST-2 dev sentences with DistilBERT-base shapes (random weights), once with
``DistilBertForSequenceClassification`` (the product) and once with ``bench.step_variants.AllRowsClassifier``
(as transformers computes it, in the Classifier's own precision over its own parameters), alternating for ``--rounds`` rounds so that machine noise hits both
alike. Prints one JSON line: the best time of each, every round's times, the speedup and the largest
logit difference between the two.
"""

import argparse
import json
import os
import time

import jax
import numpy as np
from bench.cpu_peers import read_texts
from bench.step_variants import AllRowsClassifier
from flaxsst.config import ModelConfig
from flaxsst.model import init_params
from flaxsst.classifier import Classifier
from flaxsst.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", required=True, help="a GLUE .tsv (its sentence column) or a file of one text per line")
    parser.add_argument("--tokenizer-dir", required=True, help="folder with tokenizer.json / vocab.txt")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the Classifier's for this backend")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    config = ModelConfig(id2label={0: "NEGATIVE", 1: "POSITIVE"})
    params = init_params(config, 0)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer_dir)
    texts = read_texts(args.texts)
    classifiers = {}
    for name in ("cls_only", "allrows"):
        clf = Classifier(config, params, tokenizer, batch_size=args.batch_size)
        if name == "allrows":
            model = AllRowsClassifier(config, clf.precision)
            clf.forward = jax.jit(lambda p, ids, mask, model=model: model.apply({"params": p}, ids, mask))
            clf.small_forward = None
        clf.logits(texts)  # compiles the shapes these texts need
        classifiers[name] = clf
    times: dict = {name: [] for name in classifiers}
    for _ in range(args.rounds):
        for name, clf in classifiers.items():
            start = time.perf_counter()
            clf.logits(texts)
            times[name].append(time.perf_counter() - start)
    diff = float(np.abs(classifiers["cls_only"].logits(texts) - classifiers["allrows"].logits(texts)).max())
    print(json.dumps({
        "what": "cpu_lastblock_ab", "sentences": len(texts), "batch_size": args.batch_size,
        **{f"{name}_s_best": round(min(t), 3) for name, t in times.items()},
        **{f"{name}_s_rounds": [round(x, 2) for x in t] for name, t in times.items()},
        "speedup": round(min(times["allrows"]) / min(times["cls_only"]), 3), "max_abs_logit_diff": diff,
        "jax": jax.__version__, "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
