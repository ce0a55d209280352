"""int8 dense layers on a CPU: ``Classifier(dtype="int8")``, the ``int8_dot`` of ``kernels/packed_dot.cc``.

A dense kernel ``[K, N]`` is quantized once, per output column, to int8 in [-127, 127] (``quantize_kernel``);
each row of the layer's input is quantized as it runs, to 255 unsigned levels with its own scale and a zero
point that keeps 0.0 exact. The products sum in int32 (VNNI's ``vpdpbusd``, or AMX-INT8 tiles for batches of 8
rows or more where the CPU has them, ``packed_dot.int8_amx``). Without VNNI, AVX2's ``vpmaddubsw`` first sums
the products of k = 2i and 2i + 1 in int16, saturating: there a column's scale is its largest such pair's sum of
weights of one sign over 127 (instead of its largest weight over 127), so that 255 levels times any pair stays
within int16 and the sums are exact. The result is ``(sum - zero * column_sum) * row_scale * column_scale`` in
float32, then the bias. Layer norms, softmax, GELU and the classifier head (2 outputs) stay float32. This is
ONNX Runtime's dynamic quantization with a finer grain: a scale per weight column and per input row instead of
one a tensor, and no saturation.

The packed int8 kernel keeps its ``[K, N]`` shape; flat index ``((p*K/4 + k//4)*lanes + j)*4 + k%4`` holds
``q[k, p*lanes + j]``: a panel of ``lanes`` columns, 4 consecutive k of a column side by side.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxsst import packed_dot

TARGET = packed_dot.INT8_TARGET


def quantize_kernel(kernel: Any, pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``kernel [K, N]`` -> (int8 ``[K, N]``, float32 scales ``[N]``): ``kernel ~= q * scale``, per column, the
    scale ``max |w[:, n]| / 127``; with ``pairs`` (products summed two by two in int16, ``packed_dot.int8_pairs``)
    the largest ``|w[2i, n] + w[2i+1, n]|`` over the pairs' weights of one sign, over 127: the levels' sum of
    one sign in a pair is then at most 128, and 255 * 128 fits in int16."""
    kernel = np.asarray(kernel, np.float32)
    if not kernel.size:
        return np.zeros(kernel.shape, np.int8), np.ones(kernel.shape[1], np.float32)
    if pairs:
        paired = np.pad(kernel, ((0, kernel.shape[0] % 2), (0, 0))).reshape(-1, 2, kernel.shape[1])  # [K/2, 2, N]
        positive, negative = np.maximum(paired, 0).sum(axis=1), np.minimum(paired, 0).sum(axis=1)
        bound = np.maximum(positive.max(axis=0), -negative.min(axis=0))
    else:
        bound = np.abs(kernel).max(axis=0)
    scale = bound / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(kernel / scale), -127, 127).astype(np.int8), scale


def pack(q: np.ndarray, lanes: int) -> np.ndarray:
    """int8 ``q [K, N]`` in the kernel's order (``K`` a multiple of 4, ``N`` of ``2 * lanes``)."""
    k, n = q.shape
    if k % 4 or n % (2 * lanes):
        raise ValueError(f"an int8 kernel needs K a multiple of 4 and N of {2 * lanes}; got shape {q.shape}")
    return np.ascontiguousarray(q.reshape(k // 4, 4, n // lanes, lanes).transpose(2, 0, 3, 1)).reshape(k, n)


def prepare(kernel: Any, lanes: int, pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``int8_dot``'s weights of a float ``kernel [K, N]``: (packed int8 ``[K', N]``, scales ``[N]``, int32
    column sums of the levels ``[N]``), ``K'`` being ``K`` rounded up to a multiple of 4 with rows of zeros
    (``Int8Dense`` pads its input alike); ``pairs`` as ``quantize_kernel`` takes it."""
    q, scale = quantize_kernel(kernel, pairs)
    q = np.pad(q, ((0, padded(q.shape[0]) - q.shape[0]), (0, 0)))
    return pack(q, lanes), scale, q.astype(np.int32).sum(axis=0)


def padded(k: int) -> int:
    """``k`` rounded up to a multiple of 4: the int8 kernel's input width."""
    return -(-k // 4) * 4


def quantize_params(params: dict, lanes: int, pairs: bool = False) -> dict:
    """``params`` with every dense layer whose outputs ``packed_dot.packs`` as ``Int8Dense`` reads it:
    ``kernel`` (int8, packed), ``kernel_scale`` and ``kernel_sum`` (its columns' sums of levels); everything
    else as it is. ``pairs``: ``packed_dot.int8_pairs()``, as ``quantize_kernel`` takes it."""

    def visit(tree):
        if isinstance(tree, dict):
            kernel = tree.get("kernel")
            if set(tree) == {"kernel", "bias"} and np.ndim(kernel) == 2 and packed_dot.packs(np.shape(kernel)[1], lanes):
                packed, scale, sums = prepare(kernel, lanes, pairs)
                return {"kernel": packed, "kernel_scale": scale, "kernel_sum": sums,
                        "bias": np.asarray(tree["bias"], np.float32)}
            return {name: visit(child) for name, child in tree.items()}
        return tree

    return visit(params)


def int8_dot(x: jax.Array, kernel: jax.Array, scale: jax.Array, sums: jax.Array) -> jax.Array:
    """``x [..., K]`` float32 @ the packed int8 ``kernel [K, N]`` -> float32 ``[..., N]`` (no bias)."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[1:], jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), kernel, scale, sums)


class Int8Dense(nn.Module):
    """``nn.Dense`` over a kernel ``quantize_params`` made: float32 in and out, int8 products."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = padded(x.shape[-1])
        kernel = self.param("kernel", nn.initializers.zeros_init(), (width, self.features), jnp.int8)
        scale = self.param("kernel_scale", nn.initializers.ones_init(), (self.features,), jnp.float32)
        sums = self.param("kernel_sum", nn.initializers.zeros_init(), (self.features,), jnp.int32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if width != x.shape[-1]:  # the kernel's extra rows are zeros
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
        return int8_dot(x, kernel, scale, sums) + bias
