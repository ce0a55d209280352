"""Candidate train-step implementations, timed against the trainer's own step by
``bench/throughput.py --variant``; a candidate moves into ``flaxsst.steps`` only when
the numbers on the GPU support it (bench/RESULTS.md).

- ``base``: ``flaxsst.steps.train_step``, what the trainer runs.
- ``flat``: the parameters and the AdamW moments live in one float32 vector each. A step
  casts the matmul weights to the compute dtype in one kernel and slices them out (the
  model sees exactly the values the base step gives it: Dense kernels/biases and
  embeddings in the compute dtype, LayerNorm parameters in float32), and clipping plus
  AdamW run as a few kernels over the whole vector instead of a few per tensor (~100
  tensors). Same math as ``base``; only the order of the global-norm sum differs.
- ``scan<k>`` (any base): ``k`` consecutive steps in one dispatch, ``lax.scan`` over a
  ``[k, rows, ...]`` stack of batches.

Each is a per-device function with the named batch axis, mapped by ``jax.pmap`` as the
trainer's step is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxsst.steps import AXIS, _loss_and_logits, dropout_key


class FlatLayout:
    """Static offsets of a parameter tree in one vector: leaves the model casts to the
    compute dtype first (``cast``), LayerNorm parameters (kept float32) after them."""

    def __init__(self, params: Any):
        paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.shapes = [tuple(np.shape(leaf)) for _, leaf in paths_leaves]
        is_norm = ["LayerNorm" in "/".join(str(getattr(k, "key", k)) for k in path) or
                   any(str(getattr(k, "key", k)).endswith("layer_norm") for k in path) for path, _ in paths_leaves]
        # Placement order: cast leaves, then norm leaves; ``slots[i]`` is leaf i's (start, size).
        self.cast_order = [i for i, n in enumerate(is_norm) if not n]
        self.norm_order = [i for i, n in enumerate(is_norm) if n]
        self.order = self.cast_order + self.norm_order
        self.slots: list[tuple[int, int]] = [(0, 0)] * len(self.shapes)
        offset = 0
        for i in self.order:
            size = int(np.prod(self.shapes[i], dtype=np.int64))
            self.slots[i] = (offset, size)
            offset += size
        self.size = offset
        self.cast_size = sum(self.slots[i][1] for i in self.cast_order)

    def ravel(self, params: Any) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(params)
        return jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], jnp.float32)) for i in self.order])

    def unravel(self, flat: jax.Array, compute_dtype: Any = None) -> Any:
        """Vector -> tree; with ``compute_dtype``, the cast leaves come out in it (one convert).

        The gradient of the slicing is one concatenate (``_split``'s custom VJP): left to
        autodiff, each slice's transpose is a pad to the full vector, and ~100 of them summed
        move ~100x the vector's bytes (measured: a 16x slower step on CPU).
        """
        cast = flat[: self.cast_size]
        if compute_dtype is not None:
            cast = cast.astype(compute_dtype)
        parts = dict(zip(self.cast_order, _split(cast, tuple(self.slots[i][1] for i in self.cast_order))))
        parts.update(zip(self.norm_order,
                         _split(flat[self.cast_size:], tuple(self.slots[i][1] for i in self.norm_order))))
        leaves = [parts[i].reshape(shape) for i, shape in enumerate(self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split(vector: jax.Array, sizes: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """``vector`` -> consecutive pieces of ``sizes``; the VJP concatenates the pieces' cotangents."""
    out, start = [], 0
    for size in sizes:
        out.append(jax.lax.slice_in_dim(vector, start, start + size))
        start += size
    return tuple(out)


def _split_fwd(vector, sizes):
    return _split(vector, sizes), None


def _split_bwd(sizes, _, cotangents):
    return (jnp.concatenate([jnp.ravel(c) for c in cotangents]) if cotangents else jnp.zeros((0,)),)


_split.defvjp(_split_fwd, _split_bwd)


@flax.struct.dataclass
class FlatState:
    step: jax.Array
    params: jax.Array  # [layout.size] float32
    opt_state: Any
    rng: jax.Array


def flat_optimizer(max_grad_norm: float, schedule: Callable, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Clip + Adam + lr on one vector (weight decay 0, the recipe's: no mask needed)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.scale_by_learning_rate(schedule))


def create_flat_state(params: Any, layout: FlatLayout, optimizer: optax.GradientTransformation, seed: int) -> FlatState:
    flat = layout.ravel(params)
    return FlatState(step=jnp.zeros((), jnp.int32), params=flat, opt_state=optimizer.init(flat),
                     rng=jax.random.PRNGKey(seed))


def flat_train_step(state: FlatState, batch: dict, *, model, layout: FlatLayout, optimizer, schedule: Callable,
                    compute_dtype: Any, deterministic: bool = False) -> tuple[FlatState, dict]:
    """``flaxsst.steps.train_step`` with flat parameters and optimizer state."""
    def loss_fn(flat):
        params = layout.unravel(flat, compute_dtype)
        return _loss_and_logits(model, params, batch, dropout_key(state.rng, state.step), deterministic)

    (loss_sum, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    real = jax.lax.psum(jnp.sum(batch["weights"]), AXIS)
    scale = 1.0 / jnp.maximum(real, 1.0)
    grads = jax.lax.psum(grads, AXIS) * scale
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = state.params + updates
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * batch["weights"])
    metrics = {
        "loss": jax.lax.psum(loss_sum, AXIS) * scale,
        "accuracy": jax.lax.psum(correct, AXIS) * scale,
        "grad_norm": optax.tree_utils.tree_norm(grads),
        "learning_rate": schedule(state.step),
        "examples": real,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def scan_steps(step: Callable) -> Callable:
    """``step(state, batch)`` -> ``steps(state, batches)`` over a leading ``[k, ...]`` axis (one dispatch)."""
    def steps(state, batches):
        return jax.lax.scan(step, state, batches)

    return steps


def pmapped(per_device: Callable) -> Callable:
    return jax.pmap(per_device, axis_name=AXIS, donate_argnums=(0,))


def build(variant: str, model, params: Any, train_optimizer, schedule: Callable, compute_dtype: Any, seed: int = 0,
          train=None) -> tuple[Callable, Any, int]:
    """-> (per-device step taking ``[k, rows, ...]`` batches when k > 1, initial host state, k)."""
    from flaxsst.steps import create_train_state, train_step

    base, _, k = variant.partition("_scan")
    if variant.startswith("scan"):
        base, k = "base", variant[len("scan"):]
    k = int(k) if k else 1
    if base == "base":
        step = functools.partial(train_step, model=model, optimizer=train_optimizer, schedule=schedule)
        state = create_train_state(params, train_optimizer, seed)
    elif base == "flat":
        if train.weight_decay:
            raise ValueError(f"variant {variant!r} implements weight_decay=0 only; got {train.weight_decay}")
        layout = FlatLayout(params)
        optimizer = flat_optimizer(train.max_grad_norm, schedule, train.adam_b1, train.adam_b2, train.adam_eps)
        step = functools.partial(flat_train_step, model=model, layout=layout, optimizer=optimizer, schedule=schedule,
                                 compute_dtype=compute_dtype)
        state = create_flat_state(params, layout, optimizer, seed)
    else:
        raise ValueError(f"variant {variant!r}: expected base, flat, scan<k> or flat_scan<k>")
    return (scan_steps(step) if k > 1 else step), state, k
