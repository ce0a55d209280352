"""Classifier vs transformers' PyTorch model on the CPU: the 872 SST-2 dev sentences, same weights, same process.

    python -m bench.cpu_predict --data ../shared/data/sst2 --tokenizer-dir ../shared/data/distilbert-base-uncased-finetuned-sst-2-english

DistilBERT-base shapes with random weights (the same compute as the hub weights).
transformers runs as its pipeline does: batches in input order, each padded to its
longest row, under ``torch.inference_mode``. Prints one JSON line per measurement
and a summary line with the ratio.
"""

import argparse
import csv
import json
import os
import platform
import tempfile
import time

import numpy as np


def dev_parser(description: str) -> argparse.ArgumentParser:
    """The options the CPU benches share: the SST-2 folder, the tokenizer folder, the batch size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="GLUE SST-2 folder (dev.tsv)")
    parser.add_argument("--tokenizer-dir", required=True, help="folder with tokenizer.json / vocab.txt")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def read_dev(data: str) -> list[str]:
    """The sentences of ``data/dev.tsv`` in file order."""
    with open(os.path.join(data, "dev.tsv"), encoding="utf-8", newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def main() -> None:
    parser = dev_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from flaxsst import Classifier
    from flaxsst.convert import load_pretrained
    from flaxsst.tokenizer import Tokenizer

    texts = read_dev(args.data)
    torch.manual_seed(0)
    hf = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(num_labels=2)).eval()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    config, params = load_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer_dir, max_length=128)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_dir)
    clf = Classifier(config, params, tokenizer, batch_size=args.batch_size, max_length=128)

    def run_torch():
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), args.batch_size):
                enc = hf_tokenizer(texts[start:start + args.batch_size], padding=True, truncation=True,
                                   max_length=128, return_tensors="pt")
                out.append(hf(**enc).logits.numpy())
        return np.concatenate(out)

    t = time.perf_counter()
    first = clf.logits(texts)
    compile_s = time.perf_counter() - t
    reference = run_torch()
    max_diff = float(np.abs(first - reference).max())

    def best_of(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    ours = best_of(lambda: clf.logits(texts))
    theirs = best_of(run_torch)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"what": "cpu_predict_flaxsst", "sentences": len(texts), "seconds": round(ours, 3),
                      "sentences_per_s": round(len(texts) / ours, 1), "first_call_s": round(compile_s, 2)}))
    print(json.dumps({"what": "cpu_predict_torch", "sentences": len(texts), "seconds": round(theirs, 3),
                      "sentences_per_s": round(len(texts) / theirs, 1)}))
    print(json.dumps({"what": "summary", "speedup_vs_torch": round(theirs / ours, 2), "max_abs_logit_diff": max_diff, **meta}))


if __name__ == "__main__":
    main()
