"""Draw a workdir's training curves (loss, accuracy, learning rate) from ``metrics.jsonl`` to PNG.

``python -m flaxsst.plot runs/sst2`` -> ``runs/sst2/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(workdir: Path) -> dict[str, dict[int, dict]]:
    """``{"train": {step: record}, "eval": {...}}``; a step logged twice (a resumed run) keeps its last record."""
    records: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a flaxsst training workdir?")
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{line_number} is not JSON (a run killed mid-write?); skipped", file=sys.stderr)
                continue
            records.setdefault(record["kind"], {})[record["step"]] = record
    return records


def plot_workdir(workdir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    out = Path(out) if out else workdir / "curves.png"
    records = read_metrics(workdir)
    train = sorted(records["train"].items())
    evals = sorted(records["eval"].items())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [s for s, _ in train]
    axes[0].plot(steps, [r["loss"] for _, r in train], label="train")
    if evals:
        axes[0].plot([s for s, _ in evals], [r["loss"] for _, r in evals], "o-", label="eval")
    axes[0].set(title="cross-entropy loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["accuracy"] for _, r in train], label="train")
    if evals:
        axes[1].plot([s for s, _ in evals], [r["accuracy"] for _, r in evals], "o-", label="eval")
        best_step, best = max(evals, key=lambda item: item[1]["accuracy"])
        axes[1].annotate(f"best {best['accuracy']:.4f}", (best_step, best["accuracy"]))
    axes[1].set(title="accuracy", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["learning_rate"] for _, r in train])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(workdir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxsst.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--out", help="PNG path (default: WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_workdir(args.workdir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
