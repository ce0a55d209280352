"""Evaluate a model (an export, a HF folder or a hub id) on SST-2 dev or any split/file.

    python evaluate.py --model runs/sst2/export --output runs/sst2/eval [data.path=... data.eval_split=...]

Prints accuracy, precision, recall, F1, ROC AUC, loss and the confusion matrix;
writes them to OUTPUT/eval_results.json. Exit codes: 0 done, 2 an error named in one line.
"""

import sys

from flaxsst import cli


def main(args) -> int:
    from flaxsst.config import load_train_config
    from flaxsst.evaluation import evaluate_model

    config = load_train_config(args.config, args.overrides)
    evaluate_model(args.model, config, args.output)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="evaluate.py", description=cli.first_paragraph(__doc__))
    p.add_argument("--model", required=True, help="export folder, HF folder or hub id")
    p.add_argument("--output", help="folder for eval_results.json")
    p.add_argument("--config", help="YAML whose data/model sections to use (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=glue_data/SST-2 data.eval_split=validation")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
