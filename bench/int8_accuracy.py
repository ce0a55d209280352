"""flaxsst int8 against float32 and against ONNX Runtime's int8 of the same model: accuracy, label agreement,
logit drift, memory.

    python -m bench.int8_accuracy --model EXPORT --texts ../shared/data/sst2/dev.tsv \\
        [--random-tokenizer ../shared/data/distilbert-base-uncased-finetuned-sst-2-english]

For the fine-tuned ``--model`` (an HF folder, e.g. a training run's export) and, with ``--random-tokenizer``,
random DistilBERT-base weights: each runner's logits of every text of ``--texts`` (a GLUE ``.tsv``: its labels
give the accuracy) against flaxsst float32's: dev accuracy, label agreement, max and mean absolute logit drift.
Runners: flaxsst float32 and int8 (``Classifier(dtype="int8")``), ONNX Runtime int8 (``quantize_dynamic``, int8
weights, of the model's ONNX export; also of the BERT-fused graph, the fastest ONNX Runtime int8 of
``bench.cpu_peers``, where the fusion applies) and PyTorch's dynamic quantization of its Linear layers. Memory: a
fresh process's resident set once its model answered a sentence (idle), and the weights' bytes on disk. Prints
JSON lines.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cpu_peers import cpu_facts, export_onnx, fair_batches, ort_session, random_model_dir

IDLE = """
import os, sys, psutil
kind, path = sys.argv[1], sys.argv[2]
if kind == "ort":
    import numpy as np, onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4, 5]], np.int64)
    sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
else:
    from flaxsst import Classifier
    Classifier.from_pretrained(path, dtype=kind)(["this was great"])
print(psutil.Process().memory_info().rss)
"""


def read_labelled(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], np.array([int(row["label"]) for row in rows])


def idle_rss(kind: str, path: str) -> int:
    out = subprocess.run([sys.executable, "-c", IDLE, kind, path], capture_output=True, text=True, check=True,
                         env=dict(os.environ, FLAXSST_PROGRAM_STORE="0"))
    return int(out.stdout.split()[-1])


def weights_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) or sum(
        p.stat().st_size for p in Path(folder).glob("*.bin"))


def runners_of(model_dir: str, texts: list[str], fused_heads: int | None):
    """name -> logits of ``texts`` (float32 ``[n, labels]``), and name -> (idle RSS, weights on disk)."""
    import onnx
    import torch
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from flaxsst import Classifier

    fp32 = Classifier.from_pretrained(model_dir)
    int8 = Classifier.from_pretrained(model_dir, dtype="int8")
    ids = fp32.encode(texts)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    work = tempfile.mkdtemp(prefix="int8_accuracy_")
    export_onnx(reference, ids, f"{work}/model.onnx")
    onnx_models = {"ort_int8": f"{work}/model_int8.onnx"}
    quantize_dynamic(f"{work}/model.onnx", onnx_models["ort_int8"], weight_type=QuantType.QInt8)
    if fused_heads:
        from onnxruntime.transformers.optimizer import optimize_model

        hidden = reference.config.dim
        optimize_model(f"{work}/model.onnx", model_type="bert", num_heads=fused_heads,
                       hidden_size=hidden).save_model_to_file(f"{work}/model_fused.onnx")
        onnx_models["ort_fused_int8"] = f"{work}/model_fused_int8.onnx"
        quantize_dynamic(f"{work}/model_fused.onnx", onnx_models["ort_fused_int8"], weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    torch_int8 = torch.ao.quantization.quantize_dynamic(reference, {torch.nn.Linear}, dtype=torch.qint8)

    def gather(fn):
        out = np.zeros((len(ids), reference.config.num_labels), np.float32)
        for chunk, input_ids, mask in fair_batches(ids, 32):
            out[chunk] = fn(input_ids, mask)
        return out

    def ort_fn(path):
        sess = ort_session(path, os.cpu_count())
        return lambda input_ids, mask: sess.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]

    def torch_fn(input_ids, mask):
        with torch.inference_mode():
            return torch_int8(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits.numpy()

    logits = {"flaxsst_fp32": fp32.logits(texts), "flaxsst_int8": int8.logits(texts), "torch_int8": gather(torch_fn),
              **{name: gather(ort_fn(path)) for name, path in onnx_models.items()}}
    memory = {"flaxsst_fp32": (idle_rss("float32", model_dir), weights_bytes(model_dir)),
              "flaxsst_int8": (idle_rss("int8", model_dir), weights_bytes(model_dir)),
              **{name: (idle_rss("ort", path), os.path.getsize(path)) for name, path in onnx_models.items()},
              "ort_fp32": (idle_rss("ort", f"{work}/model.onnx"), os.path.getsize(f"{work}/model.onnx"))}
    return logits, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a fine-tuned HF folder")
    parser.add_argument("--texts", required=True, help="a GLUE .tsv with sentence and label columns")
    parser.add_argument("--random-tokenizer", help="also random DistilBERT-base weights, with this tokenizer folder")
    parser.add_argument("--fused-heads", type=int, default=None,
                        help="the fine-tuned model's attention heads, for ONNX Runtime's BERT fusion (default: none)")
    args = parser.parse_args()
    import jax
    import onnxruntime
    import torch

    texts, labels = read_labelled(args.texts)
    print(json.dumps({"what": "meta", "date": time.strftime("%Y-%m-%d"), **cpu_facts(), "texts": len(texts),
                      "jax": jax.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}),
          flush=True)
    models = [("fine_tuned", args.model, args.fused_heads)]
    if args.random_tokenizer:
        models.append(("random_distilbert_base", random_model_dir(args.random_tokenizer, "int8_random_")[0], 12))
    for which, folder, heads in models:
        logits, memory = runners_of(folder, texts, heads)
        base = logits["flaxsst_fp32"]
        for name, got in logits.items():
            drift = np.abs(got - base)
            print(json.dumps({
                "what": "int8", "model": which, "runner": name,
                "accuracy": round(float(np.mean(got.argmax(1) == labels)), 4) if which == "fine_tuned" else None,
                "label_agreement_vs_flaxsst_fp32": round(float(np.mean(got.argmax(1) == base.argmax(1))), 4),
                "max_abs_logit_drift": float(drift.max()), "mean_abs_logit_drift": float(drift.mean()),
                "idle_rss_mb": round(memory[name][0] / 2**20, 1) if name in memory else None,
                "weights_on_disk_mb": round(memory[name][1] / 2**20, 1) if name in memory else None}), flush=True)
        if "ort_fp32" in memory:
            print(json.dumps({"what": "memory", "model": which, "runner": "ort_fp32",
                              "idle_rss_mb": round(memory["ort_fp32"][0] / 2**20, 1),
                              "weights_on_disk_mb": round(memory["ort_fp32"][1] / 2**20, 1)}), flush=True)


if __name__ == "__main__":
    main()
