"""Whether the trainer's step does the math of one array per tensor: the per-step train losses of
two runs, and the two steps side by side on the same batches (raw gradients, global norm, clipped
gradients, parameters). One JSON line per comparison or step.

    python -m bench.same_math losses BEFORE/metrics.jsonl AFTER/metrics.jsonl
    python -m bench.same_math steps --pretrained ../shared/data/minilm-l6 --steps 40

``steps`` builds the MiniLM recipe's model (conf/sst2_minilm.yaml, float32, shapes from the folder's
config.json, random weights) twice: the trainer's step over parameter groups and the step over
one array per tensor (``bench.layouts.TreeLayout``), and runs both on the same random batches
with dropout on, reporting per step how many tensors differ at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import layouts  # noqa: E402
from flaxsst import cli  # noqa: E402
from flaxsst.aot import model_config_of  # noqa: E402
from flaxsst.config import load_train_config  # noqa: E402
from flaxsst.errors import DataError  # noqa: E402
from flaxsst.model import DistilBertForSequenceClassification, init_params, precision_of  # noqa: E402
from flaxsst.optimizer import linear_warmup_decay, make_optimizer  # noqa: E402
from flaxsst.param_groups import ParamGroups  # noqa: E402
from flaxsst.steps import AXIS, create_train_state, dropout_key, loss_and_logits  # noqa: E402
from flaxsst.workdir import Workdir  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def train_losses(path: Path) -> dict[int, float]:
    """``{step: loss}`` of a metrics.jsonl's train records (a run's folder names its metrics.jsonl); a
    last line cut short (a killed run) is skipped."""
    if path.is_dir() and Workdir(path).metrics.is_file():
        path = Workdir(path).metrics
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    losses = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise DataError(f"{path}: line {number} is not a JSON record; expected a run's metrics.jsonl") from None
        if isinstance(record, dict) and record.get("kind") == "train":
            losses[record["step"]] = record["loss"]
    if not losses:
        raise DataError(f"{path}: no train records; expected a run's metrics.jsonl (train.log_every_steps=1 logs every step)")
    return losses


def compare_losses(before: Path, after: Path, tolerance: float) -> dict:
    """Per-step train losses of two metrics.jsonl files: how many steps are bitwise equal, where they
    first part, how many differ by more than ``tolerance``, and the largest difference."""
    a, b = train_losses(before), train_losses(after)
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in steps]
    worst = int(np.argmax(diffs)) if diffs else 0
    return {"what": "same_losses", "before": str(before), "after": str(after), "steps": len(steps),
            "bitwise": sum(d == 0 for d in diffs), "first_differing": next((s for s, d in zip(steps, diffs) if d), None),
            "beyond_tolerance": [s for s, d in zip(steps, diffs) if d > tolerance], "tolerance": tolerance,
            "max_diff": max(diffs, default=0.0), "max_at": steps[worst] if steps else None}


def _debug_step(state, batch, *, model, layout, optimizer, clip):
    """The trainer's step (``flaxsst.steps.train_step``) that also returns its raw and clipped gradients."""
    (loss_sum, _), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(
        state.params, batch, dropout_key(state.rng, state.step), model=model, groups=layout)
    scale = 1.0 / jnp.maximum(jax.lax.psum(jnp.sum(batch["weights"]), AXIS), 1.0)
    grads = jax.tree_util.tree_map(lambda g: jax.lax.psum(g, AXIS) * scale, grads)
    clipped, _ = clip.update(grads, clip.init(grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return state, {"loss": jax.lax.psum(loss_sum, AXIS) * scale, "norm": optax.tree_utils.tree_norm(grads),
                   "grads": grads, "clipped": clipped}


def compare_steps(pretrained: str, steps: int, layers: int, length: int, learning_rate: float, warmup: int) -> list[dict]:
    config = load_train_config(CONF / "sst2_minilm.yaml", [f"model.pretrained={pretrained}", "model.dtype=float32",
                                                           f"train.learning_rate={learning_rate}", f"train.warmup_steps={warmup}"])
    model_config = model_config_of(config)
    if layers:
        model_config = dataclasses.replace(model_config, n_layers=layers)
    precision = precision_of(config)
    model = DistilBertForSequenceClassification(model_config, precision)
    params = init_params(model_config, 0)
    devices = jax.local_devices()[:1]
    runs = {}
    schedule = linear_warmup_decay(config.train.learning_rate, config.train.warmup_steps, 6315)
    for name, layout in (("tree", layouts.TreeLayout()), ("groups", ParamGroups(params, precision.dtype))):
        optimizer = make_optimizer(config.train, schedule, layout.decay_mask())
        step = jax.pmap(functools.partial(_debug_step, model=model, layout=layout, optimizer=optimizer,
                                          clip=optax.clip_by_global_norm(config.train.max_grad_norm)),
                        axis_name=AXIS, devices=devices, donate_argnums=(0,))
        state = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], create_train_state(layout.pack(params), optimizer, 0))
        runs[name] = (layout, step, state)
    rng = np.random.default_rng(0)
    rows = []

    def host(layout, tree):
        return jax.tree_util.tree_leaves(layout.unpack(jax.tree_util.tree_map(lambda x: x[0], tree)))

    for i in range(steps):
        ids = rng.integers(1000, model_config.vocab_size, (1, config.train.global_batch_size, length)).astype(np.int32)
        mask = (np.arange(length) < rng.integers(4, length + 1, (1, config.train.global_batch_size, 1))).astype(np.int32)
        batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": (ids[..., 1] % 2).astype(np.int32),
                 "weights": np.ones(ids.shape[:2], np.float32)}
        out = {}
        for name, (layout, step, state) in runs.items():
            state, metrics = step(state, batch)
            runs[name] = (layout, step, state)
            out[name] = {"loss": float(metrics["loss"][0]), "norm": float(metrics["norm"][0]),
                         "grads": host(layout, metrics["grads"]), "clipped": host(layout, metrics["clipped"]),
                         "params": host(layout, state.params)}
        tree, groups = out["tree"], out["groups"]
        row = {"what": "same_step", "step": i + 1, "tensors": len(tree["grads"]),
               "loss_equal": tree["loss"] == groups["loss"], "norm_equal": tree["norm"] == groups["norm"],
               "norm": tree["norm"], "norm_diff": abs(tree["norm"] - groups["norm"])}
        for key in ("grads", "clipped", "params"):
            row[f"{key}_differing"] = sum(not np.array_equal(a, b) for a, b in zip(tree[key], groups[key]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(args: argparse.Namespace) -> int:
    """Exit 0; for ``losses``, 1 when a step differs by more than the tolerance (as ``cmp`` does)."""
    if args.command == "losses":
        if len(args.files) != 2:
            raise DataError(f"losses takes two metrics.jsonl files (before, after); got {len(args.files)}")
        result = compare_losses(*args.files, args.tolerance)
        print(json.dumps(result))
        return 1 if result["beyond_tolerance"] else cli.EXIT_OK
    if args.files or not args.pretrained:
        raise DataError("steps takes --pretrained DIR (the MiniLM folder) and no files")
    compare_steps(args.pretrained, args.steps, args.layers, args.length, args.learning_rate, args.warmup)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m bench.same_math", description=cli.first_paragraph(__doc__))
    parser.add_argument("command", choices=("losses", "steps"),
                        help="losses: compare two runs' metrics.jsonl; steps: the groups' step beside the tree's")
    parser.add_argument("files", nargs="*", type=Path, help="losses: BEFORE/metrics.jsonl AFTER/metrics.jsonl")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="losses: the largest difference per step")
    parser.add_argument("--pretrained", help="steps: the MiniLM folder whose config.json gives the shapes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=0, help="steps: blocks (default: the folder's)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=0)
    return parser


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
