"""Candidate train steps, measured against the trainer's own by ``bench.throughput --variant`` and
``bench.kernels``; a candidate becomes the product path only when the numbers support it
(bench/RESULTS.md).

- ``grouped``: the trainer's step, the parameters in groups (``flaxsst.param_groups``), on a TPU
  with the attention kernels (``flaxsst.attention``).
- ``einsum``: the trainer's step with the einsum attention everywhere (``Precision(attention="xla")``).
- ``tree``, ``flat``, ``stacked``: the step over ``bench.layouts``' layouts (one array per tensor;
  one vector; the blocks stacked and scanned), with the einsum attention: ``tree`` is the default
  step before the groups and the kernels.
- ``allrows``: the trainer's step with the classifier's last block over every position, as
  transformers computes it (``AllRowsClassifier``).
  ``bench.throughput`` takes it for inference too.
- ``scan<k>`` / ``<layout>_scan<k>``: ``k`` consecutive steps in one dispatch, ``lax.scan`` over a
  ``[k, rows, ...]`` stack of batches.

Each is a per-device function with the named batch axis, mapped by ``jax.pmap`` as the trainer's
step is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from bench import layouts
from flaxsst.config import ModelConfig, TrainSection
from flaxsst.model import DistilBertForSequenceClassification, DistilBertModel, Precision, classification_head
from flaxsst.optimizer import linear_warmup_decay, make_optimizer
from flaxsst.param_groups import ParamGroups
from flaxsst.steps import AXIS, create_train_state, train_step

LAYOUTS = ("grouped", "tree", "flat", "stacked")


def parse(variant: str) -> tuple[str, int]:
    """``"flat_scan4"`` -> ``("flat", 4)``; ``"scan4"`` -> ``("grouped", 4)``; ``"allrows"`` ->
    ``("grouped", 1)`` (``allrows`` changes the model, not the step: ``model_for``)."""
    if variant in ("allrows", "einsum"):
        return "grouped", 1
    base, _, k = variant.partition("_scan")
    if variant.startswith("scan"):
        base, k = "grouped", variant[len("scan"):]
    if base not in LAYOUTS or not (k == "" or k.isdigit()):
        raise ValueError(f"variant {variant!r}: expected allrows, einsum, scan<k>, or one of {LAYOUTS}, "
                         "optionally with _scan<k>")
    return base, int(k) if k else 1


def layout_for(variant: str, params: Any, config: ModelConfig, precision: Precision):
    name, _ = parse(variant)
    if name == "grouped":
        return ParamGroups(params, precision.dtype)
    if name == "flat":
        return layouts.FlatLayout(params, precision.dtype)
    if name == "stacked":
        return layouts.StackedLayout(config.n_layers)
    return layouts.TreeLayout()


def model_for(variant: str, config: ModelConfig, precision: Precision = Precision()):
    """The classifier a variant runs: the product's ([CLS]-only last block) but for ``allrows``, and
    the scanned one for ``stacked``; the einsum attention for every variant but the trainer's."""
    name, _ = parse(variant)
    if name != "grouped" or variant == "einsum":
        precision = dataclasses.replace(precision, attention="xla")
    if name == "stacked":
        return layouts.ScannedClassifier(config, precision)
    if variant == "allrows":
        return AllRowsClassifier(config, precision)
    return DistilBertForSequenceClassification(config, precision)


class AllRowsClassifier(nn.Module):
    """``DistilBertForSequenceClassification`` with its last block over every position, as transformers
    computes it: the same parameters and logits, ~1/n_layers more work."""

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
        hidden = DistilBertModel(self.config, self.precision, name="distilbert")(input_ids, attention_mask,
                                                                                 deterministic, cls_only=False)
        return classification_head(self.config, self.precision, hidden[:, 0], deterministic)


def scan_steps(step: Callable) -> Callable:
    """``step(state, batch)`` -> ``steps(state, batches)`` over a leading ``[k, ...]`` axis (one dispatch)."""
    def steps(state, batches):
        return jax.lax.scan(step, state, batches)

    return steps


def pmapped(per_device: Callable, devices=None) -> Callable:
    return jax.pmap(per_device, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def build(variant: str, config: ModelConfig, precision: Precision, params: Any, train: TrainSection,
          total_steps: int, seed: int = 0) -> tuple[Callable, Any, int, Any]:
    """-> (per-device step taking ``[k, rows, ...]`` batches when k > 1, the initial state (shapes
    where ``params`` are shapes), k, the layout)."""
    name, k = parse(variant)
    layout = layout_for(variant, params, config, precision)
    schedule = linear_warmup_decay(train.learning_rate, train.warmup_steps, total_steps)
    if name == "flat":
        optimizer = layouts.flat_optimizer(train, schedule, layout)
    else:
        optimizer = make_optimizer(train, schedule, layout.decay_mask())
    step = functools.partial(train_step, model=model_for(variant, config, precision), groups=layout,
                             optimizer=optimizer, schedule=schedule)
    if isinstance(jax.tree_util.tree_leaves(params)[0], jax.ShapeDtypeStruct):
        state = jax.eval_shape(lambda p: create_train_state(layout.pack(p), optimizer, seed), params)
    else:
        state = create_train_state(layout.pack(params), optimizer, seed)
    return (scan_steps(step) if k > 1 else step), state, k, layout
