"""Parameter layouts the trainer's step was measured against (bench/RESULTS.md, "Kernels per train
step"); the product holds its parameters in groups (``flaxsst.param_groups``). Each layout has the
methods the steps use: ``pack``, ``unpack``, ``view`` and ``decay_mask``.

- ``TreeLayout``: one array per tensor, the blocks unrolled (the default before the groups).
- ``FlatLayout``: parameters and AdamW moments as one float32 vector each.
- ``StackedLayout``: the blocks' parameters stacked and the blocks run as one ``nn.scan``
  (``ScannedClassifier``), so they compile once.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxsst.config import ModelConfig
from flaxsst.model import Embeddings, Precision, TransformerBlock, classification_head
from flaxsst.optimizer import decay_mask


class TreeLayout:
    """One array per tensor: the model's tree as it is."""

    scan = False

    def __init__(self, params: Any = None, compute_dtype: Any = None):
        pass

    def pack(self, tree: Any) -> Any:
        return tree

    def unpack(self, params: Any) -> Any:
        return jax.tree_util.tree_map(np.asarray, params)

    def view(self, params: Any) -> Any:
        return params

    def decay_mask(self) -> Any:
        return decay_mask


class FlatLayout:
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

    scan = False

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

    def decay_mask(self) -> Any:
        return None  # flat_optimizer decays the vector's ranges

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


def flat_optimizer(train, schedule: Callable, layout: FlatLayout) -> optax.GradientTransformation:
    """The recipe's optimizer on one vector at ``schedule``'s learning rate: weight decay covers its
    decayed ranges."""
    decay = _add_decayed_ranges(train.weight_decay, layout.decay_ranges) if train.weight_decay else optax.identity()
    return optax.chain(optax.clip_by_global_norm(train.max_grad_norm),
                       optax.scale_by_adam(b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps),
                       decay, optax.scale_by_learning_rate(schedule))


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



class StackedLayout(TreeLayout):
    """The first ``n_layers-1`` blocks' parameters stacked on a leading axis, as ``ScannedClassifier``
    takes them."""

    scan = True

    def __init__(self, n_layers: int):
        self.n_layers = n_layers

    def pack(self, tree: Any) -> Any:
        return stack_layers(tree, self.n_layers)

    def unpack(self, params: Any) -> Any:
        return unstack_layers(params, self.n_layers)


# The dropout sites of a block, as flax names their scopes (each Dropout draws its first key: counter 1).
BLOCK_DROPOUT_SITES = (("attention", "Dropout_0", 1), ("ffn", "Dropout_0", 1))


def flax_rng_hash(suffix: tuple[str | int, ...]) -> int:
    """The 32-bit number flax folds into a root key for the scope path ``suffix`` (``LazyRng``'s
    ``_fold_in_static``): a module's dropout key is ``fold_in(root, flax_rng_hash(path + (counter,)))``."""
    import flax

    digest = hashlib.sha1()
    for part in suffix:
        if flax.config.flax_fix_rng_separator:
            digest.update(b"\00")
        digest.update(part.encode("utf-8") if isinstance(part, str) else part.to_bytes((part.bit_length() + 7) // 8, "big"))
    return int.from_bytes(digest.digest()[:4], byteorder="big")


class _LayerStep(nn.Module):
    """One block as a step of ``nn.scan``: ``(hidden, the layer's dropout keys)`` -> ``(hidden, None)``."""

    config: ModelConfig
    precision: Precision
    deterministic: bool

    @nn.compact
    def __call__(self, hidden: jax.Array, dropout_keys: jax.Array, attention_mask: jax.Array):
        block = TransformerBlock(self.config, self.precision, name="block")
        return block(hidden, attention_mask, self.deterministic, dropout_keys=dropout_keys), None


class ScannedLayers(nn.Module):
    """The ``layer`` list as a scan: blocks ``0..n_layers-2`` from stacked parameters (``scan/block``),
    compiled once, then the last block as ``n_layers-1``. Its dropout keys are the ones flax derives for
    the unrolled blocks' paths, so it computes the same function as ``flaxsst.model.TransformerLayers``,
    dropout included."""

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False) -> jax.Array:
        last = self.config.n_layers - 1
        if last:
            scanned = nn.scan(_LayerStep, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast), length=last)
            hidden, _ = scanned(self.config, self.precision, deterministic, name="scan")(
                hidden, self._dropout_keys(deterministic), attention_mask)
        return TransformerBlock(self.config, self.precision, name=str(last))(hidden, attention_mask, deterministic,
                                                                             cls_only)

    def _dropout_keys(self, deterministic: bool) -> jax.Array:
        """``[n_layers-1, 2, *key]``: for each scanned block, the keys flax gives its unrolled twin."""
        last = self.config.n_layers - 1
        if deterministic or not self.has_rng("dropout"):
            return jnp.zeros((last, len(BLOCK_DROPOUT_SITES), 2), jnp.uint32)
        lazy = self.scope.rngs["dropout"]
        hashes = np.array([[flax_rng_hash(tuple(lazy.suffix) + (str(i),) + site) for site in BLOCK_DROPOUT_SITES]
                           for i in range(last)], np.uint32)
        return jax.vmap(jax.vmap(lambda h: jax.random.fold_in(lazy.rng, h)))(jnp.asarray(hashes))


class _Transformer(nn.Module):
    config: ModelConfig
    precision: Precision

    @nn.compact
    def __call__(self, hidden, attention_mask, deterministic, cls_only):
        return ScannedLayers(self.config, self.precision, name="layer")(hidden, attention_mask, deterministic, cls_only)


class _Encoder(nn.Module):
    config: ModelConfig
    precision: Precision

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic):
        hidden = Embeddings(self.config, self.precision, name="embeddings")(input_ids, deterministic)
        return _Transformer(self.config, self.precision, name="transformer")(hidden, attention_mask, deterministic, True)


class ScannedClassifier(nn.Module):
    """``flaxsst.model.DistilBertForSequenceClassification`` with its blocks scanned: the same names
    but for ``layer/scan/block`` (``stack_layers``), the same function."""

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
        hidden = _Encoder(self.config, self.precision, name="distilbert")(input_ids, attention_mask, deterministic)
        return classification_head(self.config, self.precision, hidden[:, 0], deterministic)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Per-layer parameters (``.../transformer/layer/0`` .. ``/n-1``, the HF-named tree) -> the scanned
    model's: layers ``0..n-2`` stacked under ``layer/scan/block``, the last as ``layer/n-1``."""
    return _map_layers(params, lambda layers: {
        "scan": {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                                 *[layers[str(i)] for i in range(n_layers - 1)])},
        str(n_layers - 1): layers[str(n_layers - 1)]} if n_layers > 1 else layers)


def unstack_layers(params: dict, n_layers: int) -> dict:
    """The inverse of ``stack_layers``."""
    def split(layers):
        if n_layers == 1:
            return layers
        stacked = layers["scan"]["block"]
        out = {str(i): jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], stacked) for i in range(n_layers - 1)}
        out[str(n_layers - 1)] = layers[str(n_layers - 1)]
        return out

    return _map_layers(params, split)


def _map_layers(params: dict, fn) -> dict:
    """``params`` with its ``transformer/layer`` subtree replaced by ``fn(subtree)`` (with or without the head)."""
    encoder = params.get("distilbert", params)
    layers = encoder["transformer"]["layer"]
    new_encoder = {**encoder, "transformer": {**encoder["transformer"], "layer": fn(layers)}}
    return {**params, "distilbert": new_encoder} if "distilbert" in params else new_encoder


