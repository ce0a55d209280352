"""Pure train and eval steps, written for one device with a named batch axis.

``train_step``/``eval_step`` see one device's rows; gradients and metrics are
summed over the ``batch`` axis with ``lax.psum`` and divided by the number of real
(weight 1) examples, so padding rows of a ragged last batch count for nothing and
the result does not depend on how many devices share the batch. ``p_train_step``
wraps them with ``jax.pmap`` over all local devices (several hosts take part
through ``jax.distributed``); being pure, they could be wrapped by
``jax.shard_map`` instead. Nothing here is specific to a device kind.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxsst.config import TrainSection

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; dropout keys are folded with step and device


def linear_warmup_decay(learning_rate: float, warmup_steps: int, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """transformers' ``get_linear_schedule_with_warmup``: 0 -> lr over ``warmup_steps``, then linear to 0 at ``total_steps``."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(1, warmup_steps)
        decay = jnp.maximum(0.0, (total_steps - count) / max(1, total_steps - warmup_steps))
        return learning_rate * jnp.where(count < warmup_steps, warm, decay)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight decay on kernels and embeddings; not on biases or LayerNorm scales."""
    def keep(path, _):
        names = [str(getattr(p, "key", p)) for p in path]
        return names[-1] not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train: TrainSection, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (PyTorch's ``AdamW`` update) on the linear warmup/decay schedule."""
    schedule = linear_warmup_decay(train.learning_rate, train.warmup_steps, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                    weight_decay=train.weight_decay, mask=decay_mask),
    )


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def _loss_and_logits(model: nn.Module, params, batch, dropout_key, deterministic: bool):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         deterministic=deterministic, rngs={"dropout": dropout_key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(losses * batch["weights"]), logits


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """This device's dropout key at ``step`` (inside ``pmap``): different per step and per device."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def train_step(state: TrainState, batch: dict, *, model: nn.Module, optimizer: optax.GradientTransformation,
               schedule: Callable, deterministic: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on this device's rows of a global batch (inside ``pmap`` over ``AXIS``)."""
    (loss_sum, logits), grads = jax.value_and_grad(_loss_and_logits, argnums=1, has_aux=True)(
        model, state.params, batch, dropout_key(state.rng, state.step), deterministic)
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


def eval_step(params: Any, batch: dict, *, model: nn.Module) -> dict:
    """Per-example logits and losses of this device's rows (padding rows are dropped on the host)."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return {"logits": logits, "loss": losses}


def p_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: Callable,
                 devices: Sequence[jax.Device] | None = None, deterministic: bool = False):
    """``train_step`` mapped over ``devices`` (default: all local devices), state donated."""
    fn = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, deterministic=deterministic)
    return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def p_eval_step(model: nn.Module, devices: Sequence[jax.Device] | None = None):
    return jax.pmap(functools.partial(eval_step, model=model), axis_name=AXIS, devices=devices)


def shard(batch: dict, n_devices: int) -> dict:
    """``[rows, ...]`` -> ``[n_devices, rows / n_devices, ...]``; rows must divide evenly."""
    rows = len(next(iter(batch.values())))
    if rows % n_devices:
        raise ValueError(
            f"a batch of {rows} rows does not divide evenly over {n_devices} devices; choose a global batch size "
            f"that is a multiple of the device count ({n_devices})"
        )
    return {k: v.reshape(n_devices, rows // n_devices, *v.shape[1:]) for k, v in batch.items()}


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A copy of ``tree`` per device, stacked on a leading axis as ``pmap`` takes it.

    Across several processes the host copies are passed as they are and ``pmap``
    places them; within one process they are put on the devices once, here.
    """
    devices = list(devices or jax.local_devices())
    stacked = jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x)[None], (len(devices), *np.shape(x))), tree)
    if jax.process_count() > 1:
        return stacked
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))
    return jax.device_put(stacked, sharding)


def unreplicate(tree: Any) -> Any:
    """The first local device's copy, fetched to the host as numpy (host copies, as ``replicate``
    leaves them across processes, are taken as they are)."""
    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree_util.tree_map(first, tree)


class DataParallel:
    """Maps the pure per-device steps over devices, one of two ways:

    - ``"pmap"``: ``jax.pmap``; state is stacked per device, batches are ``[devices, rows/devices, ...]``.
    - ``"shard_map"``: ``jax.jit`` of ``jax.shard_map`` over a one-axis mesh of all devices; state is one
      replicated global array per leaf and batches are ``[rows, ...]`` split over the mesh. The same
      ``train_step``/``eval_step`` run inside; jit's dispatch is cheaper per call than pmap's.

    Both span every process's devices when ``jax.distributed`` is initialised; each process passes
    its own rows of a global batch.
    """

    def __init__(self, kind: str = "pmap", devices: Sequence[jax.Device] | None = None):
        if kind not in ("pmap", "shard_map"):
            raise ValueError(f"parallel={kind!r}; expected 'pmap' or 'shard_map'")
        self.kind = kind
        if kind == "pmap":
            self.devices = list(devices) if devices else None
            self.local_count = len(devices) if devices else jax.local_device_count()
        else:
            self.devices = list(devices or jax.devices())
            self.mesh = Mesh(np.array(self.devices), (AXIS,))
            self.local_count = sum(d.process_index == jax.process_index() for d in self.devices)

    def train_step(self, model: nn.Module, optimizer, schedule: Callable, deterministic: bool = False):
        if self.kind == "pmap":
            return p_train_step(model, optimizer, schedule, self.devices, deterministic)
        fn = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, deterministic=deterministic)
        # check_vma=False: the step does its own psum, as under pmap. With the check on, grad of the
        # replicated params would come back already summed over devices (the transpose of the implicit
        # pvary), and the explicit psum would count every gradient n_devices times.
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                               out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,))

    def eval_step(self, model: nn.Module):
        if self.kind == "pmap":
            return p_eval_step(model, self.devices)
        mapped = jax.shard_map(functools.partial(eval_step, model=model), mesh=self.mesh,
                               in_specs=(PartitionSpec(), PartitionSpec(AXIS)), out_specs=PartitionSpec(AXIS),
                               check_vma=False)
        return jax.jit(mapped)

    def put_state(self, tree: Any) -> Any:
        """Host state -> device state as the steps take it (every process passes the same values)."""
        if self.kind == "pmap":
            return replicate(tree, self.devices)
        # From host copies: device_put of arrays already on the device could alias them, and the
        # donating train step would then delete the caller's arrays.
        return jax.device_put(jax.device_get(tree), NamedSharding(self.mesh, PartitionSpec()))

    def put_batch(self, rows: dict) -> dict:
        """This process's rows of a global batch -> the step's batch argument."""
        if self.kind == "pmap":
            return shard(rows, self.local_count)
        shard(rows, self.local_count)  # the same divisibility check and message
        sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in rows.items()}

    def get(self, tree: Any) -> Any:
        """Device state or metrics -> one host copy (numpy)."""
        if self.kind == "pmap":
            return unreplicate(tree)
        return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def rows(self, x: jax.Array) -> np.ndarray:
        """An eval output -> numpy ``[global rows, ...]`` in global batch order, on every process."""
        if self.kind == "pmap":
            local = np.asarray(x).reshape(-1, *x.shape[2:])
            if jax.process_count() == 1:
                return local
            from jax.experimental import multihost_utils

            return np.concatenate(list(multihost_utils.process_allgather(local)))
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
