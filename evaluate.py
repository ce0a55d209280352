"""Evaluate a model (an export, a HF folder or a hub id) on SST-2 dev or any split/file.

    python evaluate.py --model runs/sst2/export --output runs/sst2/eval [data.path=... data.eval_split=...]

Prints accuracy, precision, recall, F1, ROC AUC, loss and the confusion matrix;
writes them to OUTPUT/eval_results.json.
"""

import argparse
import logging
import sys

from flaxsst.config import ConfigError, load_train_config
from flaxsst.data import DataError
from flaxsst.trainer import evaluate_pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export folder, HF folder or hub id")
    parser.add_argument("--output", help="folder for eval_results.json")
    parser.add_argument("--config", help="YAML whose data/model sections to use (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=glue_data/SST-2 data.eval_split=validation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_train_config(args.config, args.overrides)
        evaluate_pretrained(args.model, config, args.output)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
