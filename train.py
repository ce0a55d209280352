"""Fine-tune DistilBERT (or a BERT-family encoder) on SST-2.

    python train.py --config conf/sst2.yaml --workdir runs/sst2 [key=value ...]

Rerunning the same command in the same workdir resumes from the newest intact checkpoint.
Exit codes: 0 done, 2 an error named in one line, 75 interrupted (rerun to resume).
"""

import sys

from flaxsst import cli


def main(args) -> int:
    from flaxsst.config import load_train_config
    from flaxsst.trainer import train_and_evaluate

    config = load_train_config(args.config, args.overrides)
    result = train_and_evaluate(config, args.workdir)
    if not result.finished:
        return cli.EXIT_INTERRUPTED
    print(f"done: {result.step} steps, best dev accuracy {result.best_accuracy:.4f}; exported to {result.export_dir}")
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="train.py", description=cli.first_paragraph(__doc__))
    p.add_argument("--config", required=True, help="YAML config, e.g. conf/sst2.yaml")
    p.add_argument("--workdir", required=True, help="checkpoints, logs and the export go here")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=2e-5 data.path=glue_data/SST-2")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
