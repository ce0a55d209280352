"""A workdir's training curves from ``metrics.jsonl`` as one PNG: loss (log scale), accuracy and the
learning rate from step 0, the best checkpoint marked on each.

``python -m flaxsst.plot runs/sst2`` -> ``runs/sst2/curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxsst import cli
from flaxsst.errors import ConfigError, DataError
from flaxsst.metric_log import read_metrics
from flaxsst.workdir import Workdir

TRAIN, EVAL, BEST = "#3a7dc9", "#d0563b", "#2e9d4e"


def _schedule(run: dict) -> tuple[list[int], list[float]]:
    """The planned learning rate at its corners: 0 at step 0, the peak after warmup, 0 at the end."""
    warmup, total, peak = run["warmup_steps"], run["total_steps"], run["learning_rate"]
    steps = [0, warmup, total] if warmup else [0, total]
    return steps, ([0.0, peak, 0.0] if warmup else [peak, 0.0])


def plot_workdir(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``workdir``'s curves to ``out`` (default ``workdir/curves.png``); a workdir without
    records, or an ``out`` that is no image file, is an error before anything is written."""
    import matplotlib.pyplot as plt

    layout = Workdir(workdir)
    records = read_metrics(workdir)
    if not records["train"] and not records["eval"]:
        raise DataError(f"{layout.metrics} holds no train or eval records yet; nothing to plot")
    out = _image_file(out) if out is not None else layout.curves
    fig = draw_curves(records, str(layout.root))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_curves(records: dict[str, dict[int, dict]], title: str):
    """The figure: loss, accuracy and learning-rate axes (``metric_log.read_metrics``'s records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    train = sorted(records["train"].items())
    evals = sorted(records["eval"].items())
    run = records.get("run", {}).get(0)
    best = max(evals, key=lambda item: (item[1]["accuracy"], -item[0])) if evals else None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    steps = [s for s, _ in train]

    loss, accuracy, lr = axes
    loss.plot(steps, [r["loss"] for _, r in train], color=TRAIN, linewidth=1, label="train (mean since the last log)")
    accuracy.plot(steps, [r["accuracy"] for _, r in train], color=TRAIN, linewidth=1, alpha=0.7, label="train")
    if evals:
        loss.plot([s for s, _ in evals], [r["loss"] for _, r in evals], "o-", color=EVAL, label="dev")
        accuracy.plot([s for s, _ in evals], [r["accuracy"] for _, r in evals], "o-", color=EVAL, label="dev")
    loss.set(title="cross-entropy loss (log scale)", yscale="log")
    accuracy.set(title="accuracy")
    if run is not None:
        planned_steps, planned = _schedule(run)
        lr.plot(planned_steps, planned, color="grey", linestyle="--", linewidth=1, label="planned")
    lr.plot([0] + steps, [0.0 if run and run["warmup_steps"] else (train[0][1]["learning_rate"] if train else 0.0)]
            + [r["learning_rate"] for _, r in train], color=TRAIN, label="applied")
    lr.set(title="learning rate", ylim=(0, None))
    lr.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:.1e}"))
    for ax in axes:
        if best is not None:
            ax.axvline(best[0], color=BEST, linestyle=":", linewidth=1.5, label=f"best checkpoint, step {best[0]}")
        ax.set(xlabel="step", xlim=(0, None))
        ax.grid(alpha=0.3)
        if run is not None and run.get("steps_per_epoch"):
            per_epoch = run["steps_per_epoch"]
            ax.secondary_xaxis("top", functions=(lambda s, n=per_epoch: s / n, lambda e, n=per_epoch: e * n)).set_xlabel("epoch")
    if best is not None:
        accuracy.plot([best[0]], [best[1]["accuracy"]], "*", color=BEST, markersize=14,
                      label=f"best dev accuracy {best[1]['accuracy']:.4f}")
    for ax in axes:  # legends below the plots, where they cover no curve
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, y=0.99)
    fig.tight_layout()
    return fig


def _image_file(out: str | Path) -> Path:
    """``--out``: a path ending in a format matplotlib writes, its folder created where missing."""
    from matplotlib.figure import Figure

    from flaxsst.paths import output_file

    formats = Figure().canvas.get_supported_filetypes()
    if Path(out).suffix.lstrip(".").lower() not in formats:
        raise ConfigError(f"--out={out}: name a file ending in an image format "
                          f"(.png, .pdf, .svg; any of {', '.join(sorted(formats))})")
    return output_file(out, "--out")


def main(args: argparse.Namespace) -> int:
    print(plot_workdir(args.workdir, args.out))
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.plot", description=cli.first_paragraph(__doc__))
    p.add_argument("workdir")
    p.add_argument("--out", help="PNG path (default: WORKDIR/curves.png)")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
