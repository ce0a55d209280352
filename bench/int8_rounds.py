"""flaxsst int8 against ONNX Runtime int8 alone, many alternating rounds: the dev sentences through
``Classifier(dtype="int8").logits_of_ids`` and through the BERT-fused, ``quantize_dynamic`` model a
``bench.cpu_peers`` run leaves in its folder (printed nowhere: ``/tmp/cpu_peers_*``), fairly batched at 32 and
24. On a machine whose speed drifts by tens of percent between minutes, the ratio of medians over many rounds
says more than a best of two. JSON lines.

    python -m bench.int8_rounds --work /tmp/cpu_peers_XXXX --texts ../shared/data/sst2/dev.tsv --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.cpu_peers import cpu_facts, fair_batches, ort_session, read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True,
                        help="a bench.cpu_peers run's folder (model_fused_int8.onnx, the HF model)")
    parser.add_argument("--texts", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pack", action="store_true", help="flaxsst packs several texts a row")
    args = parser.parse_args()
    from flaxsst import Classifier

    classifier = Classifier.from_pretrained(args.work, dtype="int8", pack=args.pack)
    ids = classifier.encode(read_texts(args.texts))
    session = ort_session(os.path.join(args.work, "model_fused_int8.onnx"), os.cpu_count())

    def ort_run(batch_size: int):
        def run():
            for _, input_ids, mask in fair_batches(ids, batch_size):
                session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
        return run

    runs = {"flaxsst_int8": lambda: classifier.logits_of_ids(ids), "ort_fused_int8@32": ort_run(32),
            "ort_fused_int8@24": ort_run(24)}
    for run in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    print(json.dumps({"what": "meta", **cpu_facts(), "rounds": args.rounds, "pack": args.pack}), flush=True)
    for name, values in seconds.items():
        print(json.dumps({"what": "texts", "runner": name, "best": round(min(values), 3),
                          "median": round(float(np.median(values)), 3)}), flush=True)
    peers = [name for name in runs if name.startswith("ort")]
    best = min(seconds["flaxsst_int8"]) / min(min(seconds[p]) for p in peers)
    median = np.median(seconds["flaxsst_int8"]) / min(np.median(seconds[p]) for p in peers)
    print(json.dumps({"what": "ratio", "best": round(float(best), 3), "median": round(float(median), 3)}), flush=True)


if __name__ == "__main__":
    main()
