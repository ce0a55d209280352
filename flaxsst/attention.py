"""DistilBERT's self-attention core on a TPU as two Pallas kernels, one forward and one backward, in
place of the ~12 XLA kernels (scores, softmax, its reciprocal, dropout, context, the head layout
copies, and their backward) each block launches.

``attention(query, key, value, keep, dropout_keep, heads, rate)`` computes, for each head, what the
einsum path in ``flaxsst.model`` computes::

    scores = where(keep, query_h @ key_h.T (float32), finfo(float32).min)
    weights = softmax(scores).astype(dtype); weights = where(dropout_keep, weights / (1 - rate), 0)
    context_h = weights @ value_h

with ``query`` already scaled. Queries, keys and values come as ``[batch, length, heads * head_dim]``,
the projections' own layout, so no transpose runs outside the kernel; one grid step holds one row of
the batch, all heads, in on-chip memory (the sequences here are at most 512 tokens). ``keep`` is the
padding mask ``[batch, length]`` and ``dropout_keep`` the attention dropout's keep mask ``[batch,
heads, length, length]``, drawn outside with the key and shape ``nn.Dropout`` draws it with, so the
kernel drops the same weights as the einsum path.

The backward kernel recomputes the scores and the softmax from the saved inputs (a row's scores are
small next to its activations) and writes the three input gradients. Off a TPU, ``interpret=True``
runs the same kernels through XLA: that is how the tests compare them with PyTorch and the einsum path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MASKED = float(jnp.finfo(jnp.float32).min)


def _head_slice(head: int, head_dim: int) -> slice:
    return slice(head * head_dim, (head + 1) * head_dim)


def _softmax_weights(q, k, keep_row, dropout_head, keep_prob):
    """One head: -> (the float32 softmax, the weights after dropout in the compute dtype)."""
    scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    scores = jnp.where(keep_row != 0, scores, MASKED)
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probabilities = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
    weights = probabilities.astype(q.dtype)
    if dropout_head is not None:
        weights = jnp.where(dropout_head != 0, weights / jnp.asarray(keep_prob, weights.dtype), jnp.zeros_like(weights))
    return probabilities, weights


def _forward_kernel(q_ref, k_ref, v_ref, keep_ref, *refs, heads, head_dim, keep_prob):
    dropout_ref, out_ref = refs if keep_prob is not None else (None, refs[0])
    keep_row = keep_ref[0]
    for head in range(heads):
        columns = _head_slice(head, head_dim)
        q, k, v = q_ref[0, :, columns], k_ref[0, :, columns], v_ref[0, :, columns]
        _, weights = _softmax_weights(q, k, keep_row, None if dropout_ref is None else dropout_ref[0, head], keep_prob)
        out_ref[0, :, columns] = jnp.dot(weights, v, preferred_element_type=jnp.float32).astype(out_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, keep_ref, *refs, heads, head_dim, keep_prob):
    dropout_ref, dout_ref, dq_ref, dk_ref, dv_ref = refs if keep_prob is not None else (None, *refs)
    keep_row = keep_ref[0]
    contract_rows = (((0,), (0,)), ((), ()))
    for head in range(heads):
        columns = _head_slice(head, head_dim)
        q, k, v, dout = q_ref[0, :, columns], k_ref[0, :, columns], v_ref[0, :, columns], dout_ref[0, :, columns]
        dropout_keep = None if dropout_ref is None else dropout_ref[0, head]
        probabilities, weights = _softmax_weights(q, k, keep_row, dropout_keep, keep_prob)
        dv_ref[0, :, columns] = jax.lax.dot_general(weights, dout, contract_rows,
                                                    preferred_element_type=jnp.float32).astype(dv_ref.dtype)
        dweights = jax.lax.dot_general(dout, v, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32).astype(q.dtype)
        if dropout_keep is not None:
            dweights = jnp.where(dropout_keep != 0, dweights / jnp.asarray(keep_prob, dweights.dtype),
                                 jnp.zeros_like(dweights))
        dprobabilities = dweights.astype(jnp.float32)
        dscores = probabilities * (dprobabilities - jnp.sum(dprobabilities * probabilities, axis=-1, keepdims=True))
        dscores = jnp.where(keep_row != 0, dscores, 0.0).astype(q.dtype)
        dq_ref[0, :, columns] = jnp.dot(dscores, k, preferred_element_type=jnp.float32).astype(dq_ref.dtype)
        dk_ref[0, :, columns] = jax.lax.dot_general(dscores, q, contract_rows,
                                                    preferred_element_type=jnp.float32).astype(dk_ref.dtype)


def _specs(shape: tuple, heads: int, dropout: bool, n: int) -> list:
    """Block specs of the inputs: q, k, v, keep, [dropout_keep], then ``n`` more rows like q."""
    length = shape[1]
    row = pl.BlockSpec((1, *shape[1:]), lambda b: (b, 0, 0))
    dropout_keep = [pl.BlockSpec((1, heads, length, length), lambda b: (b, 0, 0, 0))] if dropout else []
    return [row] * 3 + [pl.BlockSpec((1, 1, length), lambda b: (b, 0, 0))] + dropout_keep + [row] * n


# jit: the blocks of a model call the kernels with the same shapes, and jit's cache traces them once
@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _forward(query, key, value, keep, dropout_keep, heads, keep_prob, interpret):
    batch, length, features = query.shape
    kernel = functools.partial(_forward_kernel, heads=heads, head_dim=features // heads, keep_prob=keep_prob)
    dropout = keep_prob is not None
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype), grid=(batch,),
                          in_specs=_specs(query.shape, heads, dropout, 0),
                          out_specs=pl.BlockSpec((1, length, features), lambda b: (b, 0, 0)),
                          interpret=interpret)(query, key, value, keep, *([dropout_keep] if dropout else []))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(query, key, value, keep, dropout_keep, heads, keep_prob, interpret):
    return _forward(query, key, value, keep, dropout_keep, heads, keep_prob, interpret)


def _attention_fwd(query, key, value, keep, dropout_keep, heads, keep_prob, interpret):
    residuals = (query, key, value, keep, dropout_keep)
    return _forward(query, key, value, keep, dropout_keep, heads, keep_prob, interpret), residuals


def _attention_bwd(heads, keep_prob, interpret, residuals, dout):
    return (*_backward(*residuals, dout, heads, keep_prob, interpret), None, None)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _backward(query, key, value, keep, dropout_keep, dout, heads, keep_prob, interpret):
    batch, length, features = query.shape
    kernel = functools.partial(_backward_kernel, heads=heads, head_dim=features // heads, keep_prob=keep_prob)
    out = pl.BlockSpec((1, length, features), lambda b: (b, 0, 0))
    dropout = keep_prob is not None
    dq, dk, dv = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct(query.shape, query.dtype)] * 3,
                                grid=(batch,), in_specs=_specs(query.shape, heads, dropout, 1), out_specs=[out] * 3,
                                interpret=interpret)(query, key, value, keep, *([dropout_keep] if dropout else []),
                                                     dout.astype(query.dtype))
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, keep: jax.Array, dropout_keep: jax.Array | None,
              heads: int, rate: float, interpret: bool = False) -> jax.Array:
    """``query, key, value [batch, length, heads * head_dim]`` (``query`` scaled), ``keep [batch, length]``
    (1 = token), ``dropout_keep [batch, heads, length, length]`` (bool: kept by dropout, the kept
    weights scaled by ``1 / (1 - rate)``, ``rate < 1``; ``None``: no dropout) -> the context
    ``[batch, length, heads * head_dim]``."""
    keep_prob = None if dropout_keep is None else 1.0 - rate
    dropout_keep = None if dropout_keep is None else dropout_keep.astype(jnp.int8)
    return _attention(query, key, value, keep.astype(jnp.int32)[:, None, :], dropout_keep, heads, keep_prob, interpret)


# One batch row's [length, heads * head_dim] block, at most. The backward kernel keeps several such
# blocks and its [length, length] temporaries in the 16 MiB of on-chip memory (VMEM) a kernel gets:
# in a DistilBERT-base train step in float32 with dropout it fits at 256 tokens (768 KiB rows) and
# not at 384 (1.1 MiB); in bfloat16 it fits at 512 (768 KiB). bench/RESULTS.md lists what compiles.
ROW_BYTES = 768 * 1024


def supported(query_length: int, key_length: int, features: int, dtype) -> bool:
    """What the kernels take: every position queries (not the [CLS]-only last block), the length
    fills the TPU's 8-row tiles, a batch row fits ``ROW_BYTES``, and the compute dtype is bfloat16
    or float32 (Mosaic does not load float16 vectors)."""
    dtype = jnp.dtype(dtype)
    return (query_length == key_length and key_length % 8 == 0
            and key_length * features * dtype.itemsize <= ROW_BYTES
            and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)))
