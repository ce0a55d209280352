"""DistilBERT in Flax linen, parameter tree named like Hugging Face's state dict.

``distilbert/transformer/layer/3/attention/q_lin/kernel`` here is
``distilbert.transformer.layer.3.attention.q_lin.weight`` (transposed) there, so
conversion is a rename plus a transpose (see ``flaxsst.convert``).

Numerics follow ``transformers.DistilBertModel``: post-LayerNorm blocks with eps
``config.layer_norm_eps`` (1e-12), exact erf GELU, queries scaled by
``1/sqrt(head_dim)`` before the product. Every module takes the ``ModelConfig`` (the
``config.json``) and a ``Precision``: matmuls run in ``precision.dtype``; softmax, LayerNorm
statistics and logits in float32, and masking uses ``where`` so it is safe in float16/bfloat16.
LayerNorm outputs, and so the residual stream, are in ``precision.residual_dtype`` (default: the
compute dtype; float32 under bfloat16 is PyTorch autocast's split). Parameters are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxsst.attention import attention as tpu_attention
from flaxsst.attention import supported as tpu_attention_supported
from flaxsst.config import ATTENTION_CHOICES, ATTENTION_KINDS, ModelConfig, parse_dtype
from flaxsst.errors import ConfigError
from flaxsst.int8 import Int8Dense
from flaxsst.packed_dot import packed_dot_general, packs


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the model computes, apart from what it is: the matmuls' dtype, the residual stream's
    (``None``: the same), and the attention kernel ("auto": cuDNN's fused attention for
    half-precision inference on a GPU, ``flaxsst.attention``'s Pallas kernels in every program
    compiled for a TPU; "xla": always the einsum path).

    ``float32_accumulation``: in a dtype below float32, every matmul returns float32, adds its bias
    there and rounds once to ``dtype`` (as oneDNN's bf16 matmuls do under PyTorch autocast). XLA:CPU
    runs such a dot on its fast bf16 kernels (avx512_bf16), 1.7x a dot that returns bf16
    (bench/RESULTS.md, CPU); ``Classifier`` turns it on for a CPU.

    ``packed_lanes``: float32 on a CPU, every dense layer whose outputs are a multiple of it runs
    ``flaxsst.packed_dot`` over a kernel packed in panels of that many columns (``pack_params``);
    0, XLA's dots. ``int8_lanes``: likewise, each such layer runs ``flaxsst.int8``'s int8 dot over a kernel
    quantized and packed for it (``flaxsst.int8.quantize_params``)."""

    dtype: Any = jnp.float32
    residual_dtype: Any = None
    attention: str = "auto"
    float32_accumulation: bool = False
    packed_lanes: int = 0
    int8_lanes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.residual_dtype is not None:
            object.__setattr__(self, "residual_dtype", parse_dtype(self.residual_dtype))
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention={self.attention!r}; expected {ATTENTION_CHOICES}")
        if self.packed_lanes and self.dtype != jnp.dtype(jnp.float32):
            raise ConfigError(f"packed_lanes={self.packed_lanes} runs float32 dots; dtype is {self.dtype}")
        if self.int8_lanes and (self.dtype != jnp.dtype(jnp.float32) or self.packed_lanes):
            raise ConfigError(f"int8_lanes={self.int8_lanes} takes float32 inputs and no packed_lanes; dtype is "
                              f"{self.dtype}, packed_lanes {self.packed_lanes}")

    @property
    def layer_norm_dtype(self) -> Any:
        return self.residual_dtype or self.dtype


def precision_of(config: Any) -> Precision:
    """The ``Precision`` a training config's model section asks for (``model.dtype``,
    ``model.residual_dtype``, ``model.attention``)."""
    return Precision(config.model.dtype, config.model.residual_dtype or None, config.model.attention)


def sinusoidal_position_table(n_pos: int, dim: int) -> np.ndarray:
    """HF's ``create_sinusoidal_embeddings``: ``[n_pos, dim]`` float32."""
    position = np.arange(n_pos, dtype=np.float64)[:, None]
    j = np.arange(dim, dtype=np.float64)[None, :]
    angles = position / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.empty((n_pos, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def _accumulates_in_float32(precision: Precision) -> bool:
    return precision.float32_accumulation and jnp.dtype(precision.dtype) != jnp.dtype(jnp.float32)


def _float32_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32)


def _dense(config: ModelConfig, precision: Precision, features: int, name: str):
    """``nn.Dense`` named ``name``; with ``float32_accumulation``, its float32 result rounded once to dtype."""
    accumulate = _accumulates_in_float32(precision)
    if packs(features, precision.int8_lanes):
        return Int8Dense(features, name=name)
    if packs(features, precision.packed_lanes):
        return nn.Dense(features, dtype=jnp.float32, kernel_init=nn.initializers.normal(config.initializer_range),
                        dot_general=packed_dot_general, name=name)
    dense = nn.Dense(features, dtype=precision.dtype, kernel_init=nn.initializers.normal(config.initializer_range),
                     dot_general=_float32_dot if accumulate else None, name=name)
    if not accumulate:
        return dense

    def apply(rows: jax.Array) -> jax.Array:
        if math.prod(rows.shape[:-1]) == 1:
            # XLA:CPU's bf16 dot of a single row is ~10x slower than of two (bench/RESULTS.md, CPU)
            twice = jnp.concatenate([rows.reshape(1, -1)] * 2)
            return dense(twice)[:1].astype(precision.dtype).reshape(*rows.shape[:-1], features)
        return dense(rows).astype(precision.dtype)

    return apply


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU as transformers writes it, ``x/2 * (1 + erf(x/sqrt(2)))``. XLA's erf is one rational
    function; ``jax.nn.gelu``'s erfc form evaluates an exponential, two divisions and two polynomials per
    element, 2-3x the time on a CPU (bench/RESULTS.md, 2026-12-07), for the same values within 1e-6. In float32
    whatever ``x`` is: for negative ``x``, ``1 + erf`` cancels, and bf16 would keep ~3 significant bits of it."""
    y = x.astype(jnp.float32)
    return (y * 0.5 * (1.0 + jax.lax.erf(y * (1 / math.sqrt(2))))).astype(x.dtype)


def _layer_norm(config: ModelConfig, precision: Precision, name: str) -> "LayerNorm":
    return LayerNorm(config.layer_norm_eps, precision.layer_norm_dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: ``nn.LayerNorm``'s parameters and forward numbers (two-pass
    variance in float32: E[x^2]-E[x]^2 drifts by ~1e-5 from PyTorch's), with the backward written
    out (``layer_norm``): two row reductions instead of autodiff's chain of them, fewer kernels."""

    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
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
    return dx.astype(x.dtype), jnp.sum(dy32 * normalized, axis=rows), jnp.sum(dy32, axis=rows)


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


def _fused_attention_available(config: ModelConfig, precision: Precision) -> bool:
    """cuDNN attention: inference in float16/bfloat16 on a GPU, unless ``precision.attention == "xla"``."""
    return (
        precision.attention == "auto"
        and jnp.dtype(precision.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and jax.default_backend() == "gpu"
        and _cudnn_attention_compiles(jnp.dtype(precision.dtype).name, config.dim // config.n_heads)
    )


class Embeddings(nn.Module):
    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, input_ids: jax.Array, deterministic: bool, positions: jax.Array | None = None) -> jax.Array:
        """``input_ids [batch, seq]`` -> ``[batch, seq, dim]``; ``positions [batch, seq]``: each token's position
        in its own text (several texts packed in a row), default ``0 .. seq-1``."""
        config, dtype = self.config, self.precision.dtype
        init = nn.initializers.normal(config.initializer_range)
        words = nn.Embed(config.vocab_size, config.dim, dtype=dtype, embedding_init=init,
                         name="word_embeddings")(input_ids)
        seq_len = input_ids.shape[-1]
        if seq_len > config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings="
                f"{config.max_position_embeddings}; truncate inputs to at most that"
            )
        if positions is None:
            positions = jnp.arange(seq_len)[None]
        if config.sinusoidal_pos_embds:
            table = jnp.asarray(sinusoidal_position_table(config.max_position_embeddings, config.dim), dtype=dtype)
            positioned = table[positions]
        else:
            positioned = nn.Embed(config.max_position_embeddings, config.dim, dtype=dtype, embedding_init=init,
                                  name="position_embeddings")(positions)
        hidden = _layer_norm(config, self.precision, "LayerNorm")(words + positioned)
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic)


def _tpu_or_default(args: tuple, tpu, default):
    """``tpu(*args)`` in a program compiled for a TPU, ``default(*args)`` elsewhere (chosen when the
    program is lowered, so a TPU program compiled ahead of time on a CPU takes the TPU path)."""
    return jax.lax.platform_dependent(*args, tpu=tpu, default=default)


class _DropoutKey(nn.Module):
    """The key an ``nn.Dropout`` of this name would draw its mask with."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


class MultiHeadSelfAttention(nn.Module):
    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, dropout_key: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """``hidden [batch, seq, dim]``, ``attention_mask [batch, seq]`` (1 = token) -> ``[batch, seq, dim]``;
        with ``cls_only`` only the first position queries (all positions are keys and values): ``[batch, 1, dim]``,
        or the positions ``query_positions [batch, slots]`` name: ``[batch, slots, dim]``. A mask of
        ``[batch, queries, seq]`` says which keys each query sees (texts packed in a row: ``packed_masks``).
        ``dropout_key``: the attention dropout's key (default: flax's, from the module path)."""
        config, precision = self.config, self.precision
        batch = hidden.shape[0]
        head_dim = config.dim // config.n_heads

        def heads(name: str, rows: jax.Array) -> jax.Array:
            return _dense(config, precision, config.dim, name)(rows).reshape(batch, rows.shape[1], config.n_heads, head_dim)

        query = heads("q_lin", query_rows(hidden, query_positions) if cls_only else hidden)
        key, value = heads("k_lin", hidden), heads("v_lin", hidden)
        per_query = attention_mask.ndim == 3
        if deterministic and not cls_only and not per_query and _fused_attention_available(config, precision):
            # cuDNN's fused kernel never writes the [batch, heads, seq, seq] scores to memory (one
            # query row's scores are small, so cls_only keeps the einsum path the probe covered).
            keep = attention_mask[:, None, None, :].astype(bool)
            context = jax.nn.dot_product_attention(query, key, value, mask=keep, implementation="cudnn")
            context = context.reshape(batch, query.shape[1], config.dim)
            return _dense(config, precision, config.dim, "out_lin")(context)
        query = query / jnp.asarray(math.sqrt(head_dim), precision.dtype)
        rate = config.attention_dropout
        dropout_keep = None
        drop_all = not deterministic and rate >= 1.0  # nn.Dropout's rate 1: zeros, no key drawn
        if not deterministic and 0.0 < rate < 1.0:
            # drawn as nn.Dropout draws its mask (the same key: a child named Dropout_0), so both paths drop alike
            rng = dropout_key if dropout_key is not None else _DropoutKey(name="Dropout_0")()
            dropout_keep = jax.random.bernoulli(rng, p=1.0 - rate, shape=(batch, config.n_heads, query.shape[1],
                                                                     key.shape[1]))

        def einsum_path(query, key, value, attention_mask, dropout_keep):
            keep = (attention_mask[:, None] if per_query else attention_mask[:, None, None, :]).astype(bool)
            scores = jax.lax.platform_dependent(query, key, keep, cpu=_cpu_scores, default=_scores)
            weights = jax.nn.softmax(scores, axis=-1).astype(precision.dtype)
            if drop_all:
                weights = jnp.zeros_like(weights)
            if dropout_keep is not None:
                weights = jax.lax.select(dropout_keep, weights / (1.0 - rate), jnp.zeros_like(weights))
            accumulate = jnp.float32 if _accumulates_in_float32(precision) else None
            context = jax.lax.platform_dependent(weights, value,
                                                 cpu=functools.partial(_cpu_context, accumulate=accumulate),
                                                 default=functools.partial(_context, accumulate=accumulate))
            return context.astype(precision.dtype).reshape(batch, query.shape[1], config.dim)

        def kernel_path(query, key, value, attention_mask, dropout_keep):
            rows = (batch, -1, config.dim)
            return tpu_attention(query.reshape(rows), key.reshape(rows), value.reshape(rows), attention_mask,
                                 dropout_keep, config.n_heads, rate)

        args = (query, key, value, attention_mask, dropout_keep)
        # on a TPU: two kernels per block instead of ~12 (bench/RESULTS.md, kernels per train step)
        if (precision.attention != "xla" and not cls_only and not drop_all and not per_query
                and tpu_attention_supported(query.shape[1], key.shape[1], config.dim, precision.dtype)):
            context = _tpu_or_default(args, kernel_path, einsum_path)
        else:
            context = einsum_path(*args)
        return _dense(config, precision, config.dim, "out_lin")(context)


def _scores(query: jax.Array, key: jax.Array, keep: jax.Array) -> jax.Array:
    """float32 scores ``[batch, heads, queries, keys]`` of ``query [batch, queries, heads, d]`` and ``key``, the
    lowest float32 where ``keep`` (broadcast to the scores) is false: as transformers masks them."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    return jnp.where(keep, scores, jnp.finfo(jnp.float32).min)


def _cpu_scores(query: jax.Array, key: jax.Array, keep: jax.Array) -> jax.Array:
    """``_scores`` as XLA:CPU runs it fastest: a matmul of heads-major operands plus a mask of 0 or -1e30
    (the same softmax: a masked score's exponential is 0 either way), 2-2.5x the speed of the einsum and
    its select at 32-128 tokens (bench/RESULTS.md, 2026-12-07)."""
    scores = jnp.matmul(query.transpose(0, 2, 1, 3), key.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
    return scores + jnp.where(keep, 0.0, -1e30).astype(jnp.float32)


def _context(weights: jax.Array, value: jax.Array, accumulate: Any) -> jax.Array:
    """``weights [batch, heads, queries, keys]`` applied to ``value [batch, keys, heads, d]``: ``[batch, queries,
    heads, d]``."""
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value, preferred_element_type=accumulate)


def _cpu_context(weights: jax.Array, value: jax.Array, accumulate: Any) -> jax.Array:
    """``_context`` as a matmul of heads-major operands (``_cpu_scores``)."""
    return jnp.matmul(weights, value.transpose(0, 2, 1, 3), preferred_element_type=accumulate).transpose(0, 2, 1, 3)


class FFN(nn.Module):
    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, deterministic: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        config = self.config
        hidden = _dense(config, self.precision, config.hidden_dim, "lin1")(hidden)
        hidden = gelu(hidden) if config.activation == "gelu" else nn.relu(hidden)
        hidden = _dense(config, self.precision, config.dim, "lin2")(hidden)
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic, rng=dropout_key)


class TransformerBlock(nn.Module):
    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, dropout_keys: jax.Array | None = None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """``dropout_keys [2, ...]``: the attention and the FFN dropout's keys (default: flax's, from
        the module path; a caller that runs the block outside its usual place passes them).
        ``query_positions``: with ``cls_only``, the positions that query (default: the first)."""
        config, precision = self.config, self.precision
        keys = (None, None) if dropout_keys is None else (dropout_keys[0], dropout_keys[1])
        attended = MultiHeadSelfAttention(config, precision, name="attention")(hidden, attention_mask, deterministic,
                                                                               cls_only, keys[0], query_positions)
        if cls_only:
            hidden = query_rows(hidden, query_positions)
        hidden = _layer_norm(config, precision, "sa_layer_norm")(attended + hidden)
        transformed = FFN(config, precision, name="ffn")(hidden, deterministic, keys[1])
        return _layer_norm(config, precision, "output_layer_norm")(transformed + hidden)


class TransformerLayers(nn.Module):
    """The ``layer`` list: blocks named ``0`` .. ``n_layers-1`` as in the HF state dict."""

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, packed: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """``packed``: the last block's mask and query positions (``packed_masks``), for texts packed in rows."""
        last = self.config.n_layers - 1
        for index in range(self.config.n_layers):
            mask, queries = packed if packed is not None and index == last else (attention_mask, None)
            hidden = TransformerBlock(self.config, self.precision, name=str(index))(
                hidden, mask, deterministic, cls_only and index == last, query_positions=queries)
        return hidden


class Transformer(nn.Module):
    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 cls_only: bool = False, packed: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        return TransformerLayers(self.config, self.precision, name="layer")(hidden, attention_mask, deterministic,
                                                                            cls_only, packed)


class DistilBertModel(nn.Module):
    """The encoder: ``input_ids, attention_mask [batch, seq]`` -> hidden states ``[batch, seq, dim]``.

    ``cls_only=True``: only the first ([CLS]) position's last hidden state, ``[batch, 1, dim]``. The
    last block then queries from that position alone (every position is still a key and value), so
    its attention, output projection and FFN skip the other positions' rows: the same [CLS] state
    for ~1/n_layers less work (14% of DistilBERT-base's matmul FLOPs at 128 tokens).

    Several texts packed in a row: ``attention_mask`` holds each token's text number in its row (1, 2, ...;
    0 = padding), ``positions`` each token's position in its text, ``cls_positions [batch, slots]`` where each
    text starts (``cls_only`` then returns ``[batch, slots, dim]``). A token sees only its own text's tokens,
    so each text's states are those it has alone in a row (``packed_masks``).
    """

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        cls_only: bool = False,
        positions: jax.Array | None = None,
        cls_positions: jax.Array | None = None,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        packed = None
        if cls_positions is not None:
            attention_mask, last_mask = packed_masks(attention_mask, cls_positions)
            packed = (last_mask, cls_positions)
        hidden = Embeddings(self.config, self.precision, name="embeddings")(input_ids, deterministic, positions)
        return Transformer(self.config, self.precision, name="transformer")(hidden, attention_mask, deterministic,
                                                                            cls_only, packed)


def query_rows(hidden: jax.Array, positions: jax.Array | None) -> jax.Array:
    """The rows of ``hidden [batch, seq, dim]`` at ``positions [batch, slots]`` (default: the first)."""
    if positions is None:
        return hidden[:, :1]
    return jnp.take_along_axis(hidden, positions[:, :, None], axis=1)


def packed_masks(texts: jax.Array, cls_positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For rows of packed texts, ``texts [batch, seq]`` (each token's text number, 0 = padding) and where
    each text starts, ``cls_positions [batch, slots]``: which keys each token sees, ``[batch, seq, seq]``,
    and which keys each text's first token sees, ``[batch, slots, seq]``: the tokens of its own text."""
    real = texts[:, None, :] > 0
    first = jnp.take_along_axis(texts, cls_positions, axis=1)
    return (texts[:, :, None] == texts[:, None, :]) & real, (first[:, :, None] == texts[:, None, :]) & real


class DistilBertForSequenceClassification(nn.Module):
    """Encoder + ``pre_classifier`` + ReLU + dropout + ``classifier`` on the [CLS] vector.

    The logits read only the [CLS] position, so the encoder runs with ``cls_only`` (its last block
    computes that position alone): the same logits as Hugging Face's model, less work.

    ``input_ids, attention_mask [batch, seq]`` -> float32 logits ``[batch, num_labels]``.
    """

    config: ModelConfig
    precision: Precision = Precision()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        cls_positions: jax.Array | None = None,
    ) -> jax.Array:
        """Texts packed in rows (``DistilBertModel``'s ``positions`` and ``cls_positions``): logits
        ``[batch, slots, num_labels]``, one per text start."""
        hidden = DistilBertModel(self.config, self.precision, name="distilbert")(
            input_ids, attention_mask, deterministic, cls_only=True, positions=positions, cls_positions=cls_positions)
        return classification_head(self.config, self.precision, hidden if cls_positions is not None else hidden[:, 0],
                                   deterministic)


def classification_head(config: ModelConfig, precision: Precision, cls_vector: jax.Array,
                        deterministic: bool) -> jax.Array:
    """``pre_classifier``, ReLU, dropout and ``classifier`` on ``cls_vector [batch, dim]``, as modules of
    the calling module (call it inside an ``nn.compact`` method) -> float32 logits ``[batch, num_labels]``."""
    pooled = _dense(config, precision, config.dim, "pre_classifier")(cls_vector)
    pooled = nn.relu(pooled)
    pooled = nn.Dropout(config.seq_classif_dropout)(pooled, deterministic=deterministic)
    logits = _dense(config, precision, config.num_labels, "classifier")(pooled)
    return logits.astype(jnp.float32)


def init_params(config: ModelConfig, rng: jax.Array | int = 0) -> dict:
    """Freshly initialised float32 parameters of ``DistilBertForSequenceClassification`` (HF's init scheme)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    dummy = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(
        lambda key: DistilBertForSequenceClassification(config).init(key, dummy, jnp.ones_like(dummy))
    )(rng)["params"]
