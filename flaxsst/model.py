"""DistilBERT in Flax linen, parameter tree named like Hugging Face's state dict.

``distilbert/transformer/layer/3/attention/q_lin/kernel`` here is
``distilbert.transformer.layer.3.attention.q_lin.weight`` (transposed) there, so
conversion is a rename plus a transpose (see ``flaxsst.convert``).

Numerics follow ``transformers.DistilBertModel``: post-LayerNorm blocks with eps
``config.layer_norm_eps`` (1e-12), exact erf GELU, queries scaled by
``1/sqrt(head_dim)`` before the product. Matmuls run in ``config.dtype``; softmax,
LayerNorm statistics and logits run in float32, and masking uses ``where`` so it
is safe in float16/bfloat16. LayerNorm outputs, and so the residual stream, are in
``config.residual_dtype`` (default: ``config.dtype``; float32 under a bf16 ``dtype`` is
PyTorch autocast's split).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.config import ModelConfig


def sinusoidal_position_table(n_pos: int, dim: int) -> np.ndarray:
    """HF's ``create_sinusoidal_embeddings``: ``[n_pos, dim]`` float32."""
    position = np.arange(n_pos, dtype=np.float64)[:, None]
    j = np.arange(dim, dtype=np.float64)[None, :]
    angles = position / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.empty((n_pos, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def _dense(config: ModelConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def _layer_norm(config: ModelConfig, name: str) -> "LayerNorm":
    return LayerNorm(config.layer_norm_eps, config.residual_dtype or config.dtype, config.param_dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: ``nn.LayerNorm``'s parameters and forward numbers (two-pass
    variance in float32: E[x^2]-E[x]^2 drifts by ~1e-5 from PyTorch's), with the backward written
    out (``layer_norm``) so it takes two row reductions instead of autodiff's chain of them."""

    epsilon: float
    dtype: Any
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` over the last axis, statistics in float32."""
    return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return y.astype(dtype), (x, mean, rstd, scale)


def _layer_norm_backward(epsilon, dtype, residuals, dy):
    x, mean, rstd, scale = residuals
    dy32 = dy.astype(jnp.float32)
    normalized = (x.astype(jnp.float32) - mean) * rstd
    g = dy32 * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
                 - normalized * jnp.mean(g * normalized, axis=-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return (dx.astype(x.dtype), jnp.sum(dy32 * normalized, axis=rows).astype(scale.dtype),
            jnp.sum(dy32, axis=rows).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


@functools.lru_cache(maxsize=None)
def _cudnn_attention_compiles(dtype_name: str, head_dim: int) -> bool:
    """Whether this GPU, cuDNN and JAX build compile fused attention with a padding mask (probed once)."""
    dtype = jnp.dtype(dtype_name)
    q = jax.ShapeDtypeStruct((2, 16, 2, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((2, 1, 1, 16), jnp.bool_)
    try:
        jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
                ).lower(q, q, q, mask).compile()
    except Exception as error:  # any failure means: use the einsum path
        logging.getLogger(__name__).info("cuDNN fused attention unavailable (%s); using einsum attention", error)
        return False
    return True


def _fused_attention_available(config: ModelConfig) -> bool:
    """cuDNN attention: inference in float16/bfloat16 on a GPU, unless ``config.attention == "xla"``."""
    return (
        config.attention == "auto"
        and jnp.dtype(config.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jax.default_backend() == "gpu"
        and _cudnn_attention_compiles(jnp.dtype(config.dtype).name, config.dim // config.n_heads)
    )


class Embeddings(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
        """``input_ids [batch, seq]`` -> ``[batch, seq, dim]``."""
        config = self.config
        init = nn.initializers.normal(config.initializer_range)
        words = nn.Embed(
            config.vocab_size, config.dim, dtype=config.dtype,
            param_dtype=config.param_dtype, embedding_init=init, name="word_embeddings",
        )(input_ids)
        seq_len = input_ids.shape[-1]
        if seq_len > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings="
                f"{config.max_position_embeddings}; truncate inputs to at most that"
            )
        if config.sinusoidal_pos_embds:
            positions = jnp.asarray(
                sinusoidal_position_table(config.max_position_embeddings, config.dim)[:seq_len],
                dtype=config.dtype,
            )
        else:
            positions = nn.Embed(
                config.max_position_embeddings, config.dim, dtype=config.dtype,
                param_dtype=config.param_dtype, embedding_init=init, name="position_embeddings",
            )(jnp.arange(seq_len))
        hidden = _layer_norm(config, "LayerNorm")(words + positions[None])
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, dropout_key: jax.Array | None = None) -> jax.Array:
        """``hidden [batch, seq, dim]``, ``attention_mask [batch, seq]`` (1 = token) -> ``[batch, seq, dim]``;
        with ``cls_only`` only the first position queries (all positions are keys and values): ``[batch, 1, dim]``.
        ``dropout_key``: the attention dropout's key (default: flax's, from the module path)."""
        config = self.config
        batch = hidden.shape[0]
        head_dim = config.dim // config.n_heads

        def heads(name: str, rows: jax.Array) -> jax.Array:
            return _dense(config, config.dim, name)(rows).reshape(batch, rows.shape[1], config.n_heads, head_dim)

        query = heads("q_lin", hidden[:, :1] if cls_only else hidden)
        key, value = heads("k_lin", hidden), heads("v_lin", hidden)
        keep = attention_mask[:, None, None, :].astype(bool)
        if deterministic and not cls_only and _fused_attention_available(config):
            # cuDNN's fused kernel never writes the [batch, heads, seq, seq] scores to memory (one
            # query row's scores are small, so cls_only keeps the einsum path the probe covered).
            context = jax.nn.dot_product_attention(query, key, value, mask=keep, implementation="cudnn")
        else:
            query = query / jnp.asarray(math.sqrt(head_dim), config.dtype)
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(scores, axis=-1).astype(config.dtype)
            weights = nn.Dropout(config.attention_dropout)(weights, deterministic=deterministic, rng=dropout_key)
            context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        context = context.reshape(batch, query.shape[1], config.dim)
        return _dense(config, config.dim, "out_lin")(context)


class FFN(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        config = self.config
        hidden = _dense(config, config.hidden_dim, "lin1")(hidden)
        if config.activation == "gelu":
            hidden = nn.gelu(hidden, approximate=False)
        else:
            hidden = nn.relu(hidden)
        hidden = _dense(config, config.dim, "lin2")(hidden)
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic, rng=dropout_key)


class TransformerBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, dropout_keys: jax.Array | None = None) -> jax.Array:
        """``dropout_keys [2, ...]``: the attention and the FFN dropout's keys (default: flax's)."""
        keys = (None, None) if dropout_keys is None else (dropout_keys[0], dropout_keys[1])
        attended = MultiHeadSelfAttention(self.config, name="attention")(hidden, attention_mask, deterministic, cls_only,
                                                                          keys[0])
        if cls_only:
            hidden = hidden[:, :1]
        hidden = _layer_norm(self.config, "sa_layer_norm")(attended + hidden)
        transformed = FFN(self.config, name="ffn")(hidden, deterministic, keys[1])
        return _layer_norm(self.config, "output_layer_norm")(transformed + hidden)


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
    deterministic: bool

    @nn.compact
    def __call__(self, hidden: jax.Array, dropout_keys: jax.Array, attention_mask: jax.Array):
        block = TransformerBlock(self.config, name="block")
        return block(hidden, attention_mask, self.deterministic, dropout_keys=dropout_keys), None


class TransformerLayers(nn.Module):
    """The ``layer`` list: blocks named ``0`` .. ``n_layers-1`` as in the HF state dict.

    ``scan=True`` runs the first ``n_layers-1`` blocks as one ``nn.scan`` over stacked parameters
    (``scan/block/...``, a leading layer axis: ``stack_layers``), so they compile once, and the last
    block as ``n_layers-1``. Its dropout keys are the ones flax derives for the unrolled blocks'
    paths, so both forms compute the same function, dropout included.
    """

    config: ModelConfig
    scan: bool = False

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False) -> jax.Array:
        last = self.config.n_layers - 1
        if not self.scan:
            for index in range(self.config.n_layers):
                hidden = TransformerBlock(self.config, name=str(index))(
                    hidden, attention_mask, deterministic, cls_only and index == last)
            return hidden
        if last:
            scanned = nn.scan(_LayerStep, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast), length=last)
            hidden, _ = scanned(self.config, deterministic, name="scan")(hidden, self._dropout_keys(deterministic),
                                                                         attention_mask)
        return TransformerBlock(self.config, name=str(last))(hidden, attention_mask, deterministic, cls_only)

    def _dropout_keys(self, deterministic: bool) -> jax.Array:
        """``[n_layers-1, 2, *key]``: for each scanned block, the keys flax gives its unrolled twin."""
        last = self.config.n_layers - 1
        if deterministic or not self.has_rng("dropout"):
            return jnp.zeros((last, len(BLOCK_DROPOUT_SITES), 2), jnp.uint32)
        lazy = self.scope.rngs["dropout"]
        hashes = np.array([[flax_rng_hash(tuple(lazy.suffix) + (str(i),) + site) for site in BLOCK_DROPOUT_SITES]
                           for i in range(last)], np.uint32)
        return jax.vmap(jax.vmap(lambda h: jax.random.fold_in(lazy.rng, h)))(jnp.asarray(hashes))


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


class Transformer(nn.Module):
    config: ModelConfig
    scan: bool = False

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False) -> jax.Array:
        return TransformerLayers(self.config, self.scan, name="layer")(hidden, attention_mask, deterministic, cls_only)


class DistilBertModel(nn.Module):
    """The encoder: ``input_ids, attention_mask [batch, seq]`` -> hidden states ``[batch, seq, dim]``.

    ``cls_only=True``: only the first ([CLS]) position's last hidden state, ``[batch, 1, dim]``. The
    last block then queries from that position alone (every position is still a key and value), so
    its attention, output projection and FFN skip the other positions' rows: the same [CLS] state
    for ~1/n_layers less work (14% of DistilBERT-base's matmul FLOPs at 128 tokens).

    ``scan_layers=True``: the blocks run as one scan over stacked parameters (``TransformerLayers``).
    """

    config: ModelConfig
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        cls_only: bool = False,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = Embeddings(self.config, name="embeddings")(input_ids, deterministic)
        return Transformer(self.config, self.scan_layers, name="transformer")(hidden, attention_mask, deterministic,
                                                                              cls_only)


class DistilBertForSequenceClassification(nn.Module):
    """Encoder + ``pre_classifier`` + ReLU + dropout + ``classifier`` on the [CLS] vector.

    The logits read only the [CLS] position, so the encoder runs with ``cls_only`` (its last block
    computes that position alone): the same logits as Hugging Face's model, less work.
    ``cls_only=False`` runs the last block over every position, as transformers does (the
    bench's before/after comparison, ``bench/throughput.py --variant allrows``).

    ``scan_layers=True`` takes the parameters as ``stack_layers`` lays them out and compiles the
    blocks once (the trainer's form); the default takes them named like the HF state dict.

    ``input_ids, attention_mask [batch, seq]`` -> float32 logits ``[batch, num_labels]``.
    """

    config: ModelConfig
    cls_only: bool = True
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        config = self.config
        hidden = DistilBertModel(config, self.scan_layers, name="distilbert")(input_ids, attention_mask, deterministic,
                                                                            cls_only=self.cls_only)
        pooled = _dense(config, config.dim, "pre_classifier")(hidden[:, 0])
        pooled = nn.relu(pooled)
        pooled = nn.Dropout(config.seq_classif_dropout)(pooled, deterministic=deterministic)
        logits = _dense(config, config.num_labels, "classifier")(pooled)
        return logits.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array | int = 0) -> dict:
    """Freshly initialised parameters of ``DistilBertForSequenceClassification`` (HF's init scheme)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    dummy = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(
        lambda key: DistilBertForSequenceClassification(config).init(key, dummy, jnp.ones_like(dummy))
    )(rng)["params"]
