"""A run's metrics as it goes: ``metrics.jsonl`` (one JSON record per line), TensorBoard events, and
the console (a progress bar on a terminal, a plain line every ``log_every_steps`` otherwise, and every
evaluation). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from flaxsst.workdir import Workdir


class MetricLog:
    """Appends records to ``metrics.jsonl`` and TensorBoard: ``train`` and ``eval`` records, and one
    ``run`` record at step 0 with the schedule's shape (for the plot). A resumed run's TensorBoard
    events after ``start_step`` are purged, as ``metrics.jsonl`` was rewound (``checkpoints.rewind_metrics``)."""

    def __init__(self, workdir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Workdir(workdir).metrics
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Workdir(workdir).tensorboard), purge_step=start_step + 1 if start_step else None)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if kind != "run" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(workdir: str | Path) -> dict[str, dict[int, dict]]:
    """``{kind: {step: record}}`` from a workdir's ``metrics.jsonl``; a line that is not JSON is skipped."""
    records: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    path = Workdir(workdir).metrics
    if not path.is_file():
        from flaxsst.errors import DataError

        raise DataError(f"{path} does not exist: is {workdir} a flaxsst training workdir?")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                records.setdefault(record["kind"], {})[int(record["step"])] = record
            except (ValueError, KeyError, TypeError):
                continue
    return records


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def terminal_columns(stream: Any) -> int:
    """Columns of the terminal ``stream`` writes to; 0 where it is not a terminal, or is one that
    reports no width (some CI and ``docker exec`` shells), where a bar would print nothing."""
    import os

    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Console:
    """What a person watching the run sees: a tqdm bar on a terminal with columns, else one line per
    log. The time left is the pace since the first step of this run finished (the first step also
    places the state and warms up, longer still after a resume), times the steps left."""

    def __init__(self, start: int, end: int, enabled: bool, clock: Callable[[], float] = time.perf_counter):
        from tqdm.auto import tqdm

        self.start, self.end, self.enabled, self.clock = start, end, enabled, clock
        self.began = clock()
        self.first_step_at: float | None = None
        self.bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not (enabled and terminal_columns(sys.stderr) > 0))

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line, file=sys.stderr)

    def step(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = self.clock()
            self.bar.unpause()  # the bar's rate, too, starts after the first step
        self.bar.update(1)

    def log(self, step: int, record: dict) -> None:
        """A train record: the bar's postfix, or a line with the estimated time left."""
        if not self.enabled:
            return
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                                 ex_s=f"{record['examples_per_sec']:.0f}")
            return
        now = self.clock()
        elapsed = now - self.began
        since_first = step - self.start - 1
        if self.first_step_at is not None and since_first > 0:
            left = (now - self.first_step_at) / since_first * (self.end - step)
        else:
            left = elapsed / max(step - self.start, 1) * (self.end - step)
        self.write(f"step {step}/{self.end}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.4f}  "
                   f"lr {record['learning_rate']:.2e}  {record['examples_per_sec']:.0f} ex/s  "
                   f"elapsed {duration(elapsed)}  ETA {duration(left)}")

    def evaluation(self, step: int, epoch: float, metrics: dict, best: bool) -> None:
        self.write(f"eval at step {step} (epoch {epoch:.2f}): accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1']:.4f}  "
                   f"auc {metrics['auc']:.4f}  loss {metrics['loss']:.4f}" + ("  (best so far)" if best else ""))

    def close(self) -> None:
        self.bar.close()


def record_values(values: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a metrics dict (the confusion matrix stays out of the log)."""
    return {k: v for k, v in values.items() if k != "confusion_matrix"}
