"""Evaluate a model (an export, a HF folder or a hub id) on SST-2 dev or any split/file.

    python evaluate.py --model runs/sst2/export --output runs/sst2/eval [data.path=... data.eval_split=...]

A run's export (or its workdir) is scored on the data the run evaluated (the workdir's config.yaml)
unless --config or data.* overrides say otherwise; any other model on the built-in defaults (SST-2
dev from the hub). Prints which split, how many examples and from where, then accuracy, precision, recall, F1, ROC AUC, loss and the confusion matrix;
writes them to OUTPUT/eval_results.json. Exit codes: 0 done, 2 an error named in one line.
"""

import sys

from flaxsst import cli


def main(args) -> int:
    from flaxsst.evaluation import evaluate_model, evaluation_config

    model, config, data_origin = evaluation_config(args.model, args.config, args.overrides)
    evaluate_model(model, config, args.output, data_origin)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="evaluate.py", description=cli.first_paragraph(__doc__))
    p.add_argument("--model", required=True, help="export folder, HF folder or hub id")
    p.add_argument("--output", help="folder for eval_results.json")
    p.add_argument("--config", help="YAML whose data/model sections to use (default: the run's config.yaml for a run's "
                                       "export, else the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=glue_data/SST-2 data.eval_split=validation")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
