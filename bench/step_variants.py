"""Candidate train steps, timed against the trainer's own step by ``bench/throughput.py
--variant``; a candidate becomes the default only when the numbers on the GPU support it
(bench/RESULTS.md).

- ``base``: ``flaxsst.steps.train_step`` with the parameters as the model's tree, what the
  trainer runs by default (``train.param_layout=tree``).
- ``flat``: the same step with ``flaxsst.steps.FlatLayout`` (``train.param_layout=flat``):
  parameters and AdamW moments as one float32 vector each, so clipping and AdamW are a few
  kernels over the whole model instead of a few per tensor (~100 tensors).
- ``allrows``: the base step with the classifier's last block over every position, as
  transformers computes it and as flaxsst did before 2026-11-23
  (``DistilBertForSequenceClassification(config, cls_only=False)``); the before/after of the
  [CLS]-only last block. ``bench/throughput.py`` takes it for inference too.
- ``scan<k>`` / ``flat_scan<k>``: ``k`` consecutive steps in one dispatch, ``lax.scan`` over a
  ``[k, rows, ...]`` stack of batches (for when a trace shows the GPU idle between dispatches).

Each is a per-device function with the named batch axis, mapped by ``jax.pmap`` as the
trainer's step is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from flaxsst.config import TrainSection
from flaxsst.model import DistilBertForSequenceClassification
from flaxsst.steps import (
    AXIS,
    TreeLayout,
    create_train_state,
    linear_warmup_decay,
    make_layout,
    make_optimizer,
    train_step,
)


def parse(variant: str) -> tuple[str, int]:
    """``"flat_scan4"`` -> ``("flat", 4)``; ``"scan4"`` -> ``("tree", 4)``; ``"base"`` and ``"allrows"``
    -> ``("tree", 1)`` (``allrows`` changes the model, not the step: ``model_for``)."""
    if variant == "allrows":
        return "tree", 1
    base, _, k = variant.partition("_scan")
    if variant.startswith("scan"):
        base, k = "base", variant[len("scan"):]
    if base not in ("base", "flat") or not (k == "" or k.isdigit()):
        raise ValueError(f"variant {variant!r}: expected base, allrows, flat, scan<k> or flat_scan<k>")
    return ("tree" if base == "base" else "flat"), int(k) if k else 1


def model_for(variant: str, config) -> DistilBertForSequenceClassification:
    """The classifier a variant runs: [CLS]-only last block, except for ``allrows``."""
    parse(variant)
    return DistilBertForSequenceClassification(config, cls_only=variant != "allrows")


def scan_steps(step: Callable) -> Callable:
    """``step(state, batch)`` -> ``steps(state, batches)`` over a leading ``[k, ...]`` axis (one dispatch)."""
    def steps(state, batches):
        return jax.lax.scan(step, state, batches)

    return steps


def pmapped(per_device: Callable) -> Callable:
    return jax.pmap(per_device, axis_name=AXIS, donate_argnums=(0,))


def build(variant: str, model, params: Any, train: TrainSection, total_steps: int, compute_dtype: Any,
          seed: int = 0) -> tuple[Callable, Any, int, TreeLayout]:
    """-> (per-device step taking ``[k, rows, ...]`` batches when k > 1, initial host state, k, layout)."""
    layout_name, k = parse(variant)
    layout = make_layout(layout_name, params, compute_dtype)
    optimizer = make_optimizer(train, total_steps, layout)
    schedule = linear_warmup_decay(train.learning_rate, train.warmup_steps, total_steps)
    step = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, layout=layout)
    state = create_train_state(layout.pack(params), optimizer, seed)
    return (scan_steps(step) if k > 1 else step), state, k, layout
