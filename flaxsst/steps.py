"""Pure train and eval steps, written for one device with a named batch axis (``flaxsst.parallel``
maps them over the devices).

``train_step``/``eval_step`` see one device's rows; gradients and metrics are summed over the
``batch`` axis with ``lax.psum`` and divided by the number of real (weight 1) examples, so padding
rows of a ragged last batch count for nothing and the result does not depend on how many devices
share the batch. The state holds the parameters in groups (``flaxsst.param_groups``); the model
sees them through ``groups.view``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxsst.param_groups import ParamGroups

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # ParamGroups.pack's dict
    opt_state: Any
    rng: jax.Array  # base key; dropout keys are folded with step and device


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """This device's dropout key at ``step`` (inside ``pmap``): different per step and per device."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def loss_and_logits(params: Any, batch: dict, key: jax.Array, *, model: nn.Module,
                    groups: ParamGroups) -> tuple[jax.Array, jax.Array]:
    """This device's training loss, summed over its real rows (dropout on, keyed by ``key``), and its
    logits ``[rows, num_labels]``; differentiated with respect to ``params`` by ``train_step``."""
    logits = model.apply({"params": groups.view(params)}, batch["input_ids"], batch["attention_mask"],
                         deterministic=False, rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(losses * batch["weights"]), logits


def train_step(state: TrainState, batch: dict, *, model: nn.Module, groups: ParamGroups,
               optimizer: optax.GradientTransformation, schedule: Callable) -> tuple[TrainState, dict]:
    """One optimizer step on this device's rows of a global batch (inside ``pmap`` over ``AXIS``)."""
    (loss_sum, logits), grads = jax.value_and_grad(loss_and_logits, has_aux=True)(
        state.params, batch, dropout_key(state.rng, state.step), model=model, groups=groups)
    real = jax.lax.psum(jnp.sum(batch["weights"]), AXIS)
    scale = 1.0 / jnp.maximum(real, 1.0)
    grads = jax.tree_util.tree_map(lambda g: jax.lax.psum(g, AXIS) * scale, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * batch["weights"])
    metrics = {
        "loss": jax.lax.psum(loss_sum, AXIS) * scale,
        "accuracy": jax.lax.psum(correct, AXIS) * scale,
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "learning_rate": schedule(state.step),
        "examples": real,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict, *, model: nn.Module, groups: ParamGroups) -> dict:
    """Per-example logits and losses of this device's rows (padding rows are dropped on the host)."""
    logits = model.apply({"params": groups.view(params)}, batch["input_ids"], batch["attention_mask"], deterministic=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return {"logits": logits, "loss": losses}
