"""Fine-tune DistilBERT (or a BERT-family encoder) on SST-2.

    python train.py --config conf/sst2.yaml --workdir runs/sst2 [key=value ...]

Rerunning the same command in the same workdir resumes from the latest checkpoint.
"""

import argparse
import logging
import sys

from flaxsst.config import ConfigError, load_train_config
from flaxsst.data import DataError
from flaxsst.trainer import train_and_evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. conf/sst2.yaml")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and the export go here")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=2e-5 data.path=glue_data/SST-2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("flaxsst").setLevel(logging.INFO)
    try:
        config = load_train_config(args.config, args.overrides)
        result = train_and_evaluate(config, args.workdir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.finished:
        print(f"done: {result.step} steps, best dev accuracy {result.best_accuracy:.4f}; exported to {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
