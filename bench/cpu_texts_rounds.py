"""flaxsst fp32 against ONNX Runtime fp32 (the fastest fp32 peer of ``bench.cpu_peers``) on the texts alone, for
many rounds in turns: each round's ratio as well as the best and median of each, for a machine whose load drifts
within a run. The same random DistilBERT-base weights, fair batching and threads as ``bench.cpu_peers``.

    python -m bench.cpu_texts_rounds --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english \\
        --texts ../shared/data/sst2/dev.tsv --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from bench.cpu_peers import fair_batches, read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--peer-batch-sizes", type=int, nargs="+", default=[32, 24])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    import transformers

    from flaxsst import Classifier
    from flaxsst.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    texts = read_texts(args.texts)
    work = tempfile.mkdtemp(prefix="cpu_texts_rounds_")
    torch.manual_seed(0)
    reference = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(num_labels=2)).eval()
    reference.save_pretrained(work)
    Tokenizer.from_pretrained(args.tokenizer_dir, 512).save_pretrained(work)
    clf = Classifier.from_pretrained(work)
    ids = clf.encode(texts)
    _, ids0, mask0 = next(fair_batches(ids, 8))
    torch.onnx.export(reference, (torch.from_numpy(ids0), torch.from_numpy(mask0)), f"{work}/model.onnx",
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}},
                      opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(f"{work}/model.onnx", options, providers=["CPUExecutionProvider"])

    def ort_at(batch_size):
        def run():
            out = np.zeros((len(ids), 2), np.float32)
            for chunk, input_ids, mask in fair_batches(ids, batch_size):
                out[chunk] = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
            return out
        return run

    runs = {"flaxsst_fp32": lambda: clf.logits(texts), **{f"ort_fp32@{b}": ort_at(b) for b in args.peer_batch_sizes}}
    outputs = {name: fn() for name, fn in runs.items()}  # untimed: compiles, and the logits to compare
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peers = [name for name in runs if name.startswith("ort")]
    per_round = [times["flaxsst_fp32"][i] / min(times[p][i] for p in peers) for i in range(args.rounds)]
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps({
        "what": "texts_rounds", "date": time.strftime("%Y-%m-%d"), "texts": len(texts), "rounds": args.rounds,
        "best_s": {k: round(v, 3) for k, v in best.items()}, "median_s": {k: round(v, 3) for k, v in median.items()},
        "ratio_of_bests": round(best["flaxsst_fp32"] / min(best[p] for p in peers), 3),
        "ratio_of_medians": round(median["flaxsst_fp32"] / min(median[p] for p in peers), 3),
        "per_round_ratios": [round(r, 3) for r in per_round],
        "max_abs_logit_diff_vs_ort": float(max(np.abs(outputs["flaxsst_fp32"] - outputs[p]).max() for p in peers)),
    }), flush=True)


if __name__ == "__main__":
    main()
