"""The TPU attention kernels (``flaxsst.attention``): run through XLA on this CPU (Pallas's interpret
mode) against PyTorch's attention with the same masks, wired into the model as the einsum path is,
and chosen in programs compiled for a TPU."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flaxsst import model as model_module
from flaxsst.attention import attention, supported
from flaxsst.config import ModelConfig
from flaxsst.model import (DistilBertForSequenceClassification, DistilBertModel, Precision, classification_head,
                           init_params)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]'")
HEADS, HEAD_DIM, RATE = 4, 8, 0.1


def _torch_attention(q, k, v, keep, dropout_keep, dout, rate=RATE):
    """PyTorch, head by head: -> (context, dq, dk, dv) as numpy."""
    batch, length, _ = q.shape
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    split = lambda t: t.reshape(batch, length, HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    scores = split(tq) @ split(tk).transpose(-1, -2)
    padding = ~torch.tensor(keep, dtype=torch.bool)[:, None, None, :]
    scores = scores.masked_fill(padding, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1)
    if dropout_keep is not None:
        weights = weights * torch.tensor(dropout_keep, dtype=torch.float32) / (1 - rate)
    context = (weights @ split(tv)).transpose(1, 2).reshape(batch, length, HEADS * HEAD_DIM)
    context.backward(torch.tensor(dout))
    return [t.detach().numpy() for t in (context, tq.grad, tk.grad, tv.grad)]


def _inputs(seed: int, length: int = 16):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.normal(size=(3, length, HEADS * HEAD_DIM)).astype(np.float32) for _ in range(4))
    keep = (np.arange(length)[None, :] < np.array([[length], [length - 5], [3]])).astype(np.int32)
    dropout_keep = rng.random((3, HEADS, length, length)) < 1 - RATE
    return q, k, v, keep, dropout_keep, dout


@pytest.mark.parametrize("dropout, rate", [(False, RATE), (True, RATE), (True, 0.0)],
                         ids=["no-dropout", "dropout", "a-mask-at-rate-0"])
def test_the_kernels_compute_pytorchs_attention_and_its_gradients(dropout, rate):
    q, k, v, keep, dropout_keep, dout = _inputs(0)
    dropout_keep = dropout_keep if dropout else None
    expected = _torch_attention(q, k, v, keep, dropout_keep, dout, rate)
    mask = None if dropout_keep is None else jnp.asarray(dropout_keep)

    def run(q, k, v):
        return attention(q, k, v, jnp.asarray(keep), mask, HEADS, rate, interpret=True)

    context, pullback = jax.vjp(run, q, k, v)
    got = [context, *pullback(jnp.asarray(dout))]
    for name, a, b in zip(["context", "dq", "dk", "dv"], got, expected):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=1e-5, err_msg=name)


class _AllRowsClassifier(nn.Module):
    """The classifier with its last block over every position, so every block takes the kernel path."""

    config: ModelConfig
    precision: Precision

    @nn.compact
    def __call__(self, ids, mask, deterministic):
        hidden = DistilBertModel(self.config, self.precision, name="distilbert")(ids, mask, deterministic, cls_only=False)
        return classification_head(self.config, self.precision, hidden[:, 0], deterministic)


def _classifier_loss(precision, attention_dropout=RATE):
    config = ModelConfig(vocab_size=120, dim=HEADS * HEAD_DIM, n_layers=2, n_heads=HEADS, hidden_dim=64,
                         max_position_embeddings=32, dropout=0.1, attention_dropout=attention_dropout)
    params = init_params(config, 0)
    model = _AllRowsClassifier(config, precision)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 120, (3, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [9], [4]]), jnp.int32)

    def loss(params):
        logits = model.apply({"params": params}, ids, mask, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(5)})
        return jnp.sum(logits * jnp.array([1.0, -2.0]))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_model_on_the_kernel_path_computes_the_einsum_path(monkeypatch, dtype):
    """Training mode, dropout and padding: the TPU path's wiring (layouts, masks, the dropout key) run
    here through the interpreted kernels gives the einsum path's loss and gradients."""
    precision = Precision(dtype)
    expected_loss, expected = _classifier_loss(precision)
    monkeypatch.setattr(model_module, "_tpu_or_default", lambda args, tpu, default: tpu(*args))
    monkeypatch.setattr(model_module, "tpu_attention", functools.partial(attention, interpret=True))
    loss, grads = _classifier_loss(precision)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=tolerance)
    largest = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(expected))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(expected)):
        # the keys' bias has no gradient (softmax ignores a shift of a row's scores): rounding noise only
        scale = max(float(jnp.max(jnp.abs(b))), 1e-3 * largest)
        assert float(jnp.max(jnp.abs(a - b))) <= tolerance * scale, jax.tree_util.keystr(path)


def test_the_model_draws_the_attention_dropout_mask_as_flax_dropout_does():
    """The mask both paths apply is the one ``nn.Dropout`` named ``Dropout_0`` draws in that module."""
    shape = (2, HEADS, 16, 16)

    class WithFlaxDropout(nn.Module):
        @nn.compact
        def __call__(self):
            return nn.Dropout(RATE, name="Dropout_0")(jnp.ones(shape), deterministic=False) != 0

    class WithTheModelsKey(nn.Module):
        @nn.compact
        def __call__(self):
            return jax.random.bernoulli(model_module._DropoutKey(name="Dropout_0")(), 1 - RATE, shape)

    rngs = {"dropout": jax.random.PRNGKey(11)}
    flax_mask = WithFlaxDropout().apply({}, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(WithTheModelsKey().apply({}, rngs=rngs)), np.asarray(flax_mask))
    assert 0.8 < float(jnp.mean(flax_mask)) < 0.97


@needs_libtpu
@pytest.mark.parametrize("attention_setting, dtype, kernels",
                         [("auto", "bfloat16", 2), ("auto", "float32", 2), ("xla", "bfloat16", 0), ("auto", "float16", 0)])
def test_a_program_compiled_for_a_tpu_runs_the_kernels(attention_setting, dtype, kernels):
    """Lowered for a TPU (ahead of time, on this CPU): each block but the [CLS]-only last one runs the
    forward and the backward kernel; ``attention: xla`` keeps the einsum path, and so does float16,
    which Mosaic cannot load."""
    from flaxsst.aot import parse_slice, topology_devices

    device = topology_devices(parse_slice("v5e:2x2"))[0]
    config = ModelConfig(vocab_size=120, dim=HEADS * HEAD_DIM, n_layers=2, n_heads=HEADS, hidden_dim=64,
                         max_position_embeddings=32)
    model = DistilBertForSequenceClassification(config, Precision(dtype, attention=attention_setting))
    params = jax.eval_shape(lambda: init_params(config, 0))
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)

    def loss(params, ids):
        logits = model.apply({"params": params}, ids, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
        return jnp.sum(logits)

    sharding = jax.sharding.SingleDeviceSharding(device)
    text = jax.jit(jax.grad(loss), in_shardings=sharding, out_shardings=sharding).lower(params, ids).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == kernels


def test_attention_dropout_1_drops_every_weight_as_nn_dropout_does():
    """Rate 1: zero weights (no division by zero), so no gradient reaches the queries, keys and values."""
    loss, grads = _classifier_loss(Precision(), attention_dropout=1.0)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    attention_grads = grads["distilbert"]["transformer"]["layer"]["0"]["attention"]
    for name in ("q_lin", "k_lin", "v_lin"):
        assert float(jnp.max(jnp.abs(attention_grads[name]["kernel"]))) == 0.0, name


def test_the_kernels_take_what_fits_the_tpus_tiles_and_on_chip_memory():
    assert supported(64, 64, 768, jnp.bfloat16) and supported(128, 128, 768, jnp.float32)
    assert supported(512, 512, 768, jnp.bfloat16) and supported(256, 256, 768, jnp.float32)
    assert not supported(384, 384, 768, jnp.float32)  # out of VMEM in the backward kernel (bench/RESULTS.md)
    assert not supported(20, 20, 768, jnp.bfloat16)  # off the 8-row tiles
    assert not supported(1, 64, 768, jnp.bfloat16)  # the [CLS]-only block
    assert not supported(64, 64, 768, jnp.float16)  # Mosaic loads no float16 vectors


def test_model_attention_is_a_config_key_checked_by_name():
    from flaxsst.config import load_train_config
    from flaxsst.errors import ConfigError
    from flaxsst.model import precision_of

    conf = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
    assert precision_of(load_train_config(conf, ["model.attention=xla"])).attention == "xla"
    assert precision_of(load_train_config(conf, [])).attention == "auto"
    with pytest.raises(ConfigError, match=r"config key 'model.attention' = 'pallas'; expected 'auto' or 'xla'"):
        load_train_config(conf, ["model.attention=pallas"])


def test_a_kernel_out_of_on_chip_memory_is_one_error_naming_the_way_out():
    """XLA:TPU's message for a kernel too big for VMEM (as libtpu 0.0.42 words it) becomes one error
    naming model.attention=xla, not an HBM shortfall."""
    from flaxsst.aot import compile_program, parse_slice
    from flaxsst.errors import ConfigError

    class Program:
        def lower(self, *args):
            return self

        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of memory in memory "
                               "space vmem while allocating on stack for %_backward.1 = ... tpu_custom_call ...")

    with pytest.raises(ConfigError, match=r"^the train program at 384 tokens does not compile for v5e:2x2: a kernel "
                                          r"runs out of on-chip memory \(VMEM\); model.attention=xla keeps"):
        compile_program("train", Program(), (), parse_slice("v5e:2x2"), 384, 8, None)
