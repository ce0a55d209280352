"""Pure train and eval steps, written for one device with a named batch axis.

``train_step``/``eval_step`` see one device's rows; gradients and metrics are
summed over the ``batch`` axis with ``lax.psum`` and divided by the number of real
(weight 1) examples, so padding rows of a ragged last batch count for nothing and
the result does not depend on how many devices share the batch. The train state holds
the parameters as the model's tree (``TREE``) or as one vector (``FlatLayout``,
``train.param_layout=flat``); the steps see them through ``layout.view``. ``p_train_step``
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


def make_optimizer(train: TrainSection, total_steps: int, layout: TreeLayout | None = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (PyTorch's ``AdamW`` update) on the linear warmup/decay schedule.

    With a ``FlatLayout`` the same transformations run on the one parameter vector, and weight decay
    covers the vector's decayed ranges (``layout.decay_ranges``) instead of a mask tree.
    """
    schedule = linear_warmup_decay(train.learning_rate, train.warmup_steps, total_steps)
    if isinstance(layout, FlatLayout):
        decay = (_add_decayed_ranges(train.weight_decay, layout.decay_ranges) if train.weight_decay
                 else optax.identity())
        return optax.chain(
            optax.clip_by_global_norm(train.max_grad_norm),
            optax.scale_by_adam(b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps),
            decay,
            optax.scale_by_learning_rate(schedule),
        )
    return optax.chain(
        optax.clip_by_global_norm(train.max_grad_norm),
        optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                    weight_decay=train.weight_decay, mask=decay_mask),
    )


def _add_decayed_ranges(weight_decay: float, ranges: Sequence[tuple[int, int]]) -> optax.GradientTransformation:
    """``optax.add_decayed_weights`` on the ``[start, stop)`` ranges of one vector (an index
    comparison the update kernel fuses, not a 0/1 vector the size of the model)."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params):
        index = jax.lax.iota(jnp.int32, updates.shape[0])
        on = functools.reduce(jnp.logical_or, [(index >= a) & (index < b) for a, b in ranges],
                              jnp.zeros(updates.shape, bool))
        return updates + jnp.where(on, weight_decay * params, 0.0).astype(updates.dtype), state

    return optax.GradientTransformation(init, update)


# ---- parameter layouts: how the train state holds the parameters ------------------------------

class TreeLayout:
    """The parameters as the model's tree (the default): the optimizer runs per tensor."""

    name = "tree"

    def pack(self, tree: Any) -> Any:
        """The model's tree -> the train state's parameters."""
        return tree

    def unpack(self, params: Any) -> Any:
        """The train state's parameters (host copies) -> the model's tree."""
        return params

    def view(self, params: Any) -> Any:
        """Inside a step: the state's parameters -> the tree the model applies."""
        return params


class FlatLayout(TreeLayout):
    """The parameters (and so the AdamW moments) as one float32 vector.

    A step converts the leaves the model computes in ``compute_dtype`` with one kernel and
    slices them out (the model sees the values the tree layout gives it: Dense kernels and
    embeddings in the compute dtype, LayerNorm parameters in float32), and clipping plus AdamW
    run as a few kernels over the whole vector instead of a few per tensor (~100 tensors). The
    same math as the tree layout; only the order of the global-norm sum differs.

    Placement: leaves cast to the compute dtype first, LayerNorm leaves (kept float32) after;
    in each group the weight-decayed leaves (``decay_mask``) come first, so decay covers at most
    two ranges of the vector.
    """

    name = "flat"

    def __init__(self, params: Any, compute_dtype: Any = None):
        paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.shapes = [tuple(np.shape(leaf)) for _, leaf in paths_leaves]
        names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths_leaves]
        is_norm = ["LayerNorm" in n or "layer_norm" in n for n in names]
        decayed = jax.tree_util.tree_leaves(decay_mask(params))
        self.compute_dtype = None if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32 else compute_dtype

        def group(norm: bool) -> list[int]:  # leaf indices of one group, the decayed ones first
            return sorted((i for i, n in enumerate(is_norm) if n == norm), key=lambda i: not decayed[i])

        self.cast_order, self.norm_order = group(False), group(True)
        self.slots: list[tuple[int, int]] = [(0, 0)] * len(self.shapes)
        offset = 0
        for i in self.cast_order + self.norm_order:
            size = int(np.prod(self.shapes[i], dtype=np.int64))
            self.slots[i] = (offset, size)
            offset += size
        self.size = offset
        self.cast_size = sum(self.slots[i][1] for i in self.cast_order)
        self.decay_ranges = []
        for order in (self.cast_order, self.norm_order):
            ends = [self.slots[i][0] + self.slots[i][1] for i in order if decayed[i]]
            if ends:
                self.decay_ranges.append((self.slots[order[0]][0], max(ends)))

    def pack(self, tree: Any) -> np.ndarray:
        leaves = jax.tree_util.tree_leaves(tree)
        if len(leaves) != len(self.shapes):
            raise ValueError(f"a tree of {len(leaves)} leaves does not fit this layout of {len(self.shapes)}")
        return np.concatenate([np.ravel(np.asarray(leaves[i], np.float32)) for i in self.cast_order + self.norm_order])

    def unpack(self, params: Any) -> Any:
        flat = np.asarray(params)
        if flat.shape != (self.size,):
            raise ValueError(f"flat parameters of shape {flat.shape}; this layout holds ({self.size},)")
        leaves = [flat[start:start + size].reshape(shape) for (start, size), shape in zip(self.slots, self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def view(self, params: jax.Array) -> Any:
        """Vector -> tree, the cast leaves in the compute dtype (one convert).

        The gradient of the slicing is one concatenate (``_split``'s custom VJP): left to
        autodiff, each slice's transpose is a pad to the full vector, and ~100 of them summed
        move ~100x the vector's bytes (measured: a 16x slower step on CPU).
        """
        cast = params[: self.cast_size]
        if self.compute_dtype is not None:
            cast = cast.astype(self.compute_dtype)
        parts = dict(zip(self.cast_order, _split(cast, tuple(self.slots[i][1] for i in self.cast_order))))
        parts.update(zip(self.norm_order,
                         _split(params[self.cast_size:], tuple(self.slots[i][1] for i in self.norm_order))))
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

TREE = TreeLayout()


def make_layout(name: str, params: Any, compute_dtype: Any = None) -> TreeLayout:
    """``"tree"`` or ``"flat"`` (``train.param_layout``) for these parameters."""
    if name == "tree":
        return TREE
    if name == "flat":
        return FlatLayout(params, compute_dtype)
    raise ValueError(f"param_layout={name!r}; expected 'tree' or 'flat'")


def create_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def _loss_and_logits(model: nn.Module, params, batch, dropout_key, deterministic: bool, layout: TreeLayout = TREE):
    logits = model.apply({"params": layout.view(params)}, batch["input_ids"], batch["attention_mask"],
                         deterministic=deterministic, rngs={"dropout": dropout_key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(losses * batch["weights"]), logits


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """This device's dropout key at ``step`` (inside ``pmap``): different per step and per device."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(AXIS))


def train_step(state: TrainState, batch: dict, *, model: nn.Module, optimizer: optax.GradientTransformation,
               schedule: Callable, deterministic: bool = False, layout: TreeLayout = TREE) -> tuple[TrainState, dict]:
    """One optimizer step on this device's rows of a global batch (inside ``pmap`` over ``AXIS``).
    ``layout`` says how ``state.params`` holds the model's parameters (``TREE``, or a ``FlatLayout``)."""
    (loss_sum, logits), grads = jax.value_and_grad(_loss_and_logits, argnums=1, has_aux=True)(
        model, state.params, batch, dropout_key(state.rng, state.step), deterministic, layout)
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


def eval_step(params: Any, batch: dict, *, model: nn.Module, layout: TreeLayout = TREE) -> dict:
    """Per-example logits and losses of this device's rows (padding rows are dropped on the host)."""
    logits = model.apply({"params": layout.view(params)}, batch["input_ids"], batch["attention_mask"], deterministic=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return {"logits": logits, "loss": losses}


def p_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: Callable,
                 devices: Sequence[jax.Device] | None = None, deterministic: bool = False, layout: TreeLayout = TREE):
    """``train_step`` mapped over ``devices`` (default: all local devices), state donated."""
    fn = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, deterministic=deterministic,
                           layout=layout)
    return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def p_eval_step(model: nn.Module, devices: Sequence[jax.Device] | None = None, layout: TreeLayout = TREE):
    return jax.pmap(functools.partial(eval_step, model=model, layout=layout), axis_name=AXIS, devices=devices)


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
    return put_stacked(stacked, devices)


def put_stacked(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Host arrays with a leading axis of one slice per device -> on ``devices`` (default: all
    local ones), slice i on device i, as ``pmap`` takes them. Across several processes the host
    copies are returned as they are and ``pmap`` places them."""
    if jax.process_count() > 1:
        return tree
    devices = list(devices or jax.local_devices())
    return jax.device_put(tree, NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS)))


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

    def train_step(self, model: nn.Module, optimizer, schedule: Callable, deterministic: bool = False,
                   layout: TreeLayout = TREE):
        if self.kind == "pmap":
            return p_train_step(model, optimizer, schedule, self.devices, deterministic, layout)
        fn = functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, deterministic=deterministic,
                               layout=layout)
        # check_vma=False: the step does its own psum, as under pmap. With the check on, grad of the
        # replicated params would come back already summed over devices (the transpose of the implicit
        # pvary), and the explicit psum would count every gradient n_devices times.
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS)),
                               out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
        return jax.jit(mapped, donate_argnums=(0,))

    def eval_step(self, model: nn.Module, layout: TreeLayout = TREE):
        if self.kind == "pmap":
            return p_eval_step(model, self.devices, layout)
        mapped = jax.shard_map(functools.partial(eval_step, model=model, layout=layout), mesh=self.mesh,
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
        """This process's rows of a global batch -> the step's batch argument, already on the devices
        (the trainer calls this in its prefetch thread, so the copies overlap the running step)."""
        if self.kind == "pmap":
            return put_stacked(shard(rows, self.local_count), self.devices)
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
