"""flaxsst fp32 against ONNX Runtime fp32 (the fastest fp32 peer of ``bench.cpu_peers``) on the texts alone, for
many rounds in turns: each round's ratio as well as the best and median of each, for a machine whose load drifts
within a run. The same random DistilBERT-base weights, fair batching and threads as ``bench.cpu_peers``. With
``--dtype int8``: flaxsst int8 against ONNX Runtime's BERT-fused model quantized by ``quantize_dynamic``.

    python -m bench.cpu_texts_rounds --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english \\
        --texts ../shared/data/sst2/dev.tsv --rounds 9 [--dtype int8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.cpu_peers import export_onnx, fair_batches, fused_int8, ort_session, random_model_dir, read_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--peer-batch-sizes", type=int, nargs="+", default=[32, 24])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", choices=["fp32", "int8"], default="fp32")
    args = parser.parse_args()

    import torch

    from flaxsst import Classifier

    torch.set_num_threads(args.threads)
    texts = read_texts(args.texts)
    work, reference = random_model_dir(args.tokenizer_dir, "cpu_texts_rounds_")
    clf = Classifier.from_pretrained(work, dtype="int8" if args.dtype == "int8" else "float32")
    ids = clf.encode(texts)
    export_onnx(reference, ids, f"{work}/model.onnx")
    peer = fused_int8(f"{work}/model.onnx") if args.dtype == "int8" else f"{work}/model.onnx"
    session = ort_session(peer, args.threads)
    ours, theirs = f"flaxsst_{args.dtype}", "ort_fused_int8" if args.dtype == "int8" else "ort_fp32"

    def ort_at(batch_size):
        def run():
            out = np.zeros((len(ids), 2), np.float32)
            for chunk, input_ids, mask in fair_batches(ids, batch_size):
                out[chunk] = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
            return out
        return run

    runs = {ours: lambda: clf.logits(texts), **{f"{theirs}@{b}": ort_at(b) for b in args.peer_batch_sizes}}
    outputs = {name: fn() for name, fn in runs.items()}  # untimed: compiles, and the logits to compare
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peers = [name for name in runs if name.startswith("ort")]
    per_round = [times[ours][i] / min(times[p][i] for p in peers) for i in range(args.rounds)]
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(json.dumps({
        "what": "texts_rounds", "date": time.strftime("%Y-%m-%d"), "texts": len(texts), "rounds": args.rounds,
        "best_s": {k: round(v, 3) for k, v in best.items()}, "median_s": {k: round(v, 3) for k, v in median.items()},
        "ratio_of_bests": round(best[ours] / min(best[p] for p in peers), 3),
        "ratio_of_medians": round(median[ours] / min(median[p] for p in peers), 3),
        "per_round_ratios": [round(r, 3) for r in per_round],
        "max_abs_logit_diff_vs_ort": float(max(np.abs(outputs[ours] - outputs[p]).max() for p in peers)),
    }), flush=True)


if __name__ == "__main__":
    main()
