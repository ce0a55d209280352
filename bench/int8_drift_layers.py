"""Where int8's logit drift from fp32 comes from: the largest and mean |int8 - fp32| logit over the texts with
some dense layers left out of int8, either float32 through and through or float32 rows over the int8 weights
(the weights' rounding alone). Each ``--keep`` is a comma list of parameter-path fragments (``pre_classifier``,
``layer/5/ffn``); an empty one is the product's int8. An experiment on ``Classifier``'s internals: it swaps
``flaxsst.int8.quantize_params`` and ``Int8Dense`` for versions that skip those layers. JSON lines.

    python -m bench.int8_drift_layers --model DIR --texts ../shared/data/sst2/dev.tsv \\
        --keep "" pre_classifier "layer/5/ffn,layer/5/attention/q_lin,layer/5/attention/out_lin,pre_classifier"
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from bench.cpu_peers import cpu_facts, read_texts
from flaxsst import int8, packed_dot
from flaxsst.classifier import Classifier

PRODUCT_QUANTIZE = int8.quantize_params
PRODUCT_CALL = int8.Int8Dense.__call__


def quantize_except(keep: list[str], weights_int8: bool):
    """``quantize_params`` as the product does it, then the layers whose path holds a part of ``keep`` back
    in float (their float32 kernel, or its int8 levels times their scales)."""
    def quantize(params: dict, lanes: int, pairs: bool = False) -> dict:
        def visit(original, done, path):
            kept_out = any(part in "/".join(path) for part in keep)
            if not isinstance(done, dict) or ("kernel_scale" in done and not kept_out):
                return done
            if "kernel_scale" in done:
                q, scale = int8.quantize_kernel(original["kernel"], pairs)
                kept = q.astype(np.float32) * scale if weights_int8 else np.asarray(original["kernel"], np.float32)
                return {"kernel": kept, "bias": np.asarray(original["bias"], np.float32)}
            return {name: visit(original[name], child, path + (name,)) for name, child in done.items()}
        return visit(params, PRODUCT_QUANTIZE(params, lanes, pairs), ())
    return quantize


def call(self, x):
    """``Int8Dense`` over a float kernel (a kept layer): a float32 dot."""
    if self.has_variable("params", "kernel_scale"):
        return PRODUCT_CALL(self, x)
    kernel, bias = self.get_variable("params", "kernel"), self.get_variable("params", "bias")
    return jnp.dot(x, kernel, precision="highest") + bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF folder (DistilBERT)")
    parser.add_argument("--texts", required=True, help="a GLUE .tsv (its sentence column) or one text per line")
    parser.add_argument("--keep", nargs="+", default=[""], help="comma lists of parameter-path fragments")
    args = parser.parse_args()
    texts = read_texts(args.texts)
    fp32 = Classifier.from_pretrained(args.model)
    ids = fp32.encode(texts)
    reference = fp32.logits_of_ids(ids)
    print(json.dumps({"what": "meta", **cpu_facts(), "texts": len(texts), "levels": packed_dot.int8_levels(),
                      "pairs": packed_dot.int8_pairs()}),
          flush=True)
    int8.Int8Dense.__call__ = call
    try:
        for keep in args.keep:
            parts = [part for part in keep.split(",") if part]
            for weights_int8 in ([False, True] if parts else [False]):
                int8.quantize_params = quantize_except(parts, weights_int8)
                drift = np.abs(Classifier.from_pretrained(args.model, dtype="int8").logits_of_ids(ids) - reference)
                kept_as = "int8 weights, float32 rows" if weights_int8 else "float32"
                figures = {"max": round(float(drift.max()), 5), "mean": round(float(drift.mean()), 5)}
                print(json.dumps({"what": "drift", "kept": parts, "kept_as": kept_as, **figures}), flush=True)
    finally:
        int8.quantize_params, int8.Int8Dense.__call__ = PRODUCT_QUANTIZE, PRODUCT_CALL


if __name__ == "__main__":
    main()
