"""Evaluation over all devices: every example of a split counted exactly once, and the metrics of
the model card. The trainer evaluates with it, and so does ``evaluate.py`` (``evaluate_model``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from flaxsst.config import ModelConfig, TrainConfig, check_sequence_length
from flaxsst.data import TokenizedSplit, eval_index_batches, load_tokenized, make_batch, process_slice
from flaxsst.metrics import classification_metrics, format_table
from flaxsst.parallel import gather_rows, put_batch
from flaxsst.workdir import Workdir


def global_eval_batch(batch_size: int, n_devices: int | None = None) -> int:
    """Rows of a global eval batch: ``batch_size`` rounded down to a multiple of the device count
    (default: every device of the run)."""
    n_devices = n_devices or jax.device_count()
    return max(n_devices, batch_size // n_devices * n_devices)


def predict_split(eval_fn: Callable, params: Any, split: TokenizedSplit, batch_size: int, buckets,
                  max_seq_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, num_labels]`` and per-example losses ``[n]`` of every example of ``split``, in order;
    ``eval_fn(params, batch)`` is the pmapped eval step."""
    rows = global_eval_batch(batch_size)
    all_logits, all_losses = [], []
    for indices in eval_index_batches(len(split), rows):
        batch = process_slice(make_batch(split, indices, rows, buckets, max_seq_length, pad_id),
                              jax.process_index(), jax.process_count())
        out = eval_fn(params, put_batch(batch))
        all_logits.append(gather_rows(out["logits"])[: len(indices)])
        all_losses.append(gather_rows(out["loss"])[: len(indices)])
    return np.concatenate(all_logits), np.concatenate(all_losses)


def evaluate(eval_fn: Callable, params: Any, split: TokenizedSplit, model_config: ModelConfig, config: TrainConfig,
             pad_id: int) -> dict:
    """The metrics of ``classification_metrics`` for ``split``."""
    logits, _ = predict_split(eval_fn, params, split, config.train.eval_batch_size, config.data.length_buckets,
                              config.data.max_seq_length, pad_id)
    return classification_metrics(split.labels, logits, model_config.num_labels)


def write_results(path: Path, metrics: dict, split: TokenizedSplit, **about: Any) -> None:
    """``eval_results.json``: the metrics and what they describe: the split's name and source (its size
    is ``num_examples``), and the model or checkpoint step."""
    from flaxsst.checkpoints import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    described = {"split": split.name, "source": split.source, **about}
    write_atomically(path, json.dumps({**metrics, **described}, indent=2) + "\n")


def describe_split(split: TokenizedSplit) -> str:
    """``split 'validation': 400 examples from synthetic [validation]``: what an evaluation scores."""
    return f"split {split.name!r}: {len(split)} examples from {split.source}"


def training_workdir(model: str | os.PathLike) -> Path | None:
    """The training workdir that ``model`` is (or is the ``export`` of), if it holds its ``config.yaml``."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    here = Workdir(path)
    if here.config.is_file() and here.export.is_dir():
        return path
    parent = Workdir(path.resolve().parent)
    if parent.config.is_file() and parent.export.resolve() == path.resolve():
        return parent.root
    return None


def evaluation_config(model: str, config_path: str | None, overrides: list[str]) -> tuple[str, TrainConfig, str]:
    """-> (the model folder, the config to evaluate with, where its data settings come from). A run's
    export (or its workdir) is evaluated on what the run evaluated: the workdir's ``config.yaml``, then
    ``overrides``; ``--config`` replaces it."""
    from flaxsst.config import load_train_config

    workdir = training_workdir(model)
    if workdir is not None and Path(model).expanduser().resolve() == workdir.resolve():
        model = str(Workdir(workdir).export)
    if config_path is None and workdir is not None:
        config_path = str(Workdir(workdir).config)
        origin = f"the run's settings ({config_path})"
    elif config_path is None:
        origin = "the built-in defaults"
    else:
        origin = f"--config {config_path}"
    changed = [item for item in overrides if item.startswith("data.")]
    if changed:
        origin += ", with " + " ".join(changed)
    return model, load_train_config(config_path, overrides), origin


def evaluate_model(model: str, config: TrainConfig, output: str | os.PathLike | None = None,
                   data_origin: str = "") -> dict:
    """Evaluate a HF folder / hub id / export on ``config.data.eval_split`` over all devices;
    print the table and write ``eval_results.json`` to ``output``. ``data_origin`` says where the
    data settings come from (printed and written)."""
    from flaxsst.convert import read_pretrained
    from flaxsst.hub import resolve_model_dir
    from flaxsst.model import DistilBertForSequenceClassification, precision_of
    from flaxsst.param_groups import ParamGroups
    from flaxsst.parallel import initialize_distributed, pmap_eval_step, replicate
    from flaxsst.paths import cache_home, output_folder
    from flaxsst.tokenizer import Tokenizer

    initialize_distributed(config)
    if output is not None:
        output = output_folder(output, "--output")
    folder = resolve_model_dir(model, key="--model")
    model_config, params = read_pretrained(folder)
    check_sequence_length(config, model_config, model)
    tokenizer = Tokenizer.from_folder(folder, config.data.max_seq_length)
    cache_dir = Path(config.data.cache_dir or cache_home() / "tokens")
    split = load_tokenized(config.data, config.data.eval_split, tokenizer, model_config.label2id, cache_dir, config.train.seed)
    precision = precision_of(config)
    groups = ParamGroups(params, precision.dtype)
    eval_fn = pmap_eval_step(DistilBertForSequenceClassification(model_config, precision), groups)
    metrics = evaluate(eval_fn, replicate(groups.pack(params)), split, model_config, config, tokenizer.pad_id)
    if jax.process_index() == 0:
        print(f"{describe_split(split)} (data settings: {data_origin or 'as given'}); model {model}")
        print(format_table(metrics, model_config.id2label))
        if output is not None:
            write_results(Workdir(output).eval_results, metrics, split, model=str(model),
                          data_settings=data_origin or "as given")
    return metrics

