"""A training workdir's layout: the one place its files and folders are named.

    .lock              held by the run's process 0 (``checkpoints.WorkdirLock``)
    config.yaml        the run's resolved config; a rerun must match it
    checkpoints/       committed checkpoints (``checkpoints.Checkpoints``)
    cache/             tokenized splits, unless ``data.cache_dir`` names another folder
    metrics.jsonl      train, eval and run records (``metric_log``)
    tensorboard/       the same records as TensorBoard events
    export/            the best checkpoint in Hugging Face layout
    eval_results.json  the exported checkpoint's metrics (``evaluate.py --output`` writes the same name)
    curves.png         the training curves (``plot``)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Workdir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(os.fspath(self.root)))

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval_results.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"
