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
                    weight_decay=train.weight_decay,
                    mask=layout.decay_mask() if isinstance(layout, GroupedLayout) else decay_mask),
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
    scan = False  # whether the model runs its blocks as a scan over stacked parameters

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
        return jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], jnp.float32)) for i in self.cast_order + self.norm_order])

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


class GroupedLayout(TreeLayout):
    """Leaves of one shape stacked into one array per group (all [768, 768] kernels, all [768]
    biases, ...): clipping and AdamW run over ~10 arrays instead of ~100 tensors, and the model, its
    blocks unrolled, reads each tensor as a slice of its group.

    A group holds leaves alike in shape, in whether the model computes them in ``compute_dtype``
    (LayerNorm parameters stay float32) and in whether they are weight-decayed. The gradient of the
    slicing stacks the slices' gradients (``_unstack``'s custom VJP)."""

    name = "grouped"

    def __init__(self, params: Any, compute_dtype: Any = None):
        paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths_leaves]
        decayed = jax.tree_util.tree_leaves(decay_mask(params))
        self.compute_dtype = None if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32 else compute_dtype
        self.shapes = [tuple(np.shape(leaf)) for _, leaf in paths_leaves]
        groups: dict[tuple, list[int]] = {}
        for i, name in enumerate(names):
            norm = "LayerNorm" in name or "layer_norm" in name
            groups.setdefault((self.shapes[i], norm, bool(decayed[i])), []).append(i)
        self.groups = [(f"g{k:02d}_{'x'.join(map(str, shape)) or 'scalar'}{'_norm' if norm else ''}{'_decay' if decay else ''}",
                        indices, norm, decay) for k, ((shape, norm, decay), indices) in enumerate(groups.items())]

    def pack(self, tree: Any) -> dict:
        leaves = jax.tree_util.tree_leaves(tree)
        return {name: jnp.stack([jnp.asarray(leaves[i], jnp.float32) for i in indices])
                for name, indices, _, _ in self.groups}

    def unpack(self, params: dict) -> Any:
        leaves: list = [None] * len(self.shapes)
        for name, indices, _, _ in self.groups:
            group = np.asarray(params[name])
            for j, i in enumerate(indices):
                leaves[i] = group[j]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def view(self, params: dict) -> Any:
        leaves: list = [None] * len(self.shapes)
        for name, indices, norm, _ in self.groups:
            group = params[name]
            if not norm and self.compute_dtype is not None:
                group = group.astype(self.compute_dtype)
            for i, piece in zip(indices, _unstack(group)):
                leaves[i] = piece
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def decay_mask(self) -> dict:
        return {name: decay for name, _, _, decay in self.groups}


@jax.custom_vjp
def _unstack(group: jax.Array) -> tuple[jax.Array, ...]:
    """``[n, ...]`` -> its n slices; the VJP stacks the slices' cotangents (one kernel per group)."""
    return tuple(group[i] for i in range(group.shape[0]))


def _unstack_fwd(group):
    return _unstack(group), None


def _unstack_bwd(_, cotangents):
    return (jnp.stack(cotangents),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


class StackedLayout(TreeLayout):
    """The first ``n_layers-1`` blocks' parameters stacked on a leading axis, as the scanned model
    takes them (``model.stack_layers``): the blocks compile once, their gradients arrive stacked from
    the scan, and clipping and AdamW run over ~6 times fewer tensors."""

    name = "stacked"
    scan = True

    def __init__(self, n_layers: int):
        self.n_layers = n_layers

    def pack(self, tree: Any) -> Any:
        from flaxsst.model import stack_layers

        return stack_layers(tree, self.n_layers)

    def unpack(self, params: Any) -> Any:
        from flaxsst.model import unstack_layers

        return unstack_layers(params, self.n_layers)


def make_layout(name: str, params: Any, compute_dtype: Any = None, n_layers: int = 0) -> TreeLayout:
    """``"tree"``, ``"flat"`` or ``"stacked"`` (``train.param_layout``) for these parameters."""
    if name == "tree":
        return TREE
    if name == "flat":
        return FlatLayout(params, compute_dtype)
    if name == "stacked":
        return StackedLayout(n_layers)
    if name == "grouped":
        return GroupedLayout(params, compute_dtype)
    raise ValueError(f"param_layout={name!r}; expected 'tree', 'flat', 'grouped' or 'stacked'")


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
