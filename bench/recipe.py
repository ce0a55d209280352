"""The full SST-2 recipe through the trainer, timed: compile, training (compile, eval and
checkpoint saves excluded), examples/s, and dev metrics. Prints one JSON line.

    python bench/recipe.py --config conf/sst2.yaml --workdir /tmp/r model.init="" data.path=glue_data/SST-2
    python bench/recipe.py --config conf/sst2_minilm.yaml --workdir /tmp/m model.init=/path/to/minilm data.path=...

``model.init=""`` trains a random-init DistilBERT-base (the hub weights' shapes and
compute) for timing. The batches are the recipe's; config overrides change only
what the command line says (e.g. model.dtype, data.length_buckets).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from flaxsst.config import load_train_config  # noqa: E402
from flaxsst.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tokenizer", help="tokenizer folder when model.init is empty (random init)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flaxsst").setLevel(logging.INFO)
    overrides = list(args.overrides)
    if args.tokenizer:
        overrides.append(f"model.tokenizer={args.tokenizer}")
    config = load_train_config(args.config, overrides)
    start = time.perf_counter()
    result = Trainer(config, args.workdir).run()
    wall = time.perf_counter() - start
    examples = result.step * config.train.global_batch_size
    metrics = {k: v for k, v in (result.eval_metrics or {}).items()}
    print(json.dumps({
        "what": "flaxsst_recipe", "config": args.config, "overrides": args.overrides, "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "jax": jax.__version__, "steps": result.step,
        "compile_s": round(result.compile_seconds, 2), "train_s": round(result.train_seconds, 2),
        "examples_per_s": round(examples / result.train_seconds, 1), "wall_s": round(wall, 1), **metrics,
    }), flush=True)


if __name__ == "__main__":
    main()
