"""Train steps on 8 devices against 1 device and against a PyTorch reference; the lr schedule against
transformers; the parameter groups the state holds."""

import jax
import numpy as np
import pytest
import torch
import transformers

from flaxsst.config import TrainSection
from flaxsst.convert import config_from_hf, state_dict_to_params
from flaxsst.errors import ConfigError
from flaxsst.model import DistilBertForSequenceClassification
from flaxsst.optimizer import linear_warmup_decay, make_optimizer
from flaxsst.param_groups import ParamGroups
from flaxsst.parallel import pmap_train_step, put_batch, replicate, unreplicate
from flaxsst.steps import AXIS, create_train_state, dropout_key
from tests.fixtures import random_ids, tiny_hf_config


def test_learning_rate_at_every_recipe_step_equals_transformers_linear_schedule():
    total, warmup, lr = 6_315, 600, 1e-5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total):
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    ours = np.asarray(jax.jit(jax.vmap(linear_warmup_decay(lr, warmup, total)))(np.arange(total)))
    assert len(ours) == 6_315
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-14)
    assert ours[0] == 0 and ours[600] == pytest.approx(1e-5)


def _tiny(seed=0, **dropouts):
    torch.manual_seed(seed)
    hf = transformers.DistilBertForSequenceClassification(
        tiny_hf_config(120, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, **dropouts)).eval()
    config, family = config_from_hf(hf.config.to_dict())
    params, _ = state_dict_to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, config, family)
    return hf, config, params


def _batch(rows, real, seq=24, seed=0):
    ids, mask = random_ids(np.random.default_rng(seed), rows, seq, 120)
    labels = np.random.default_rng(seed + 1).integers(0, 2, rows)
    weights = (np.arange(rows) < real).astype(np.float32)
    return {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
            "labels": labels.astype(np.int32), "weights": weights}


def _run_steps(config, params, batches, n_devices, train, total):
    devices = jax.devices()[:n_devices]
    groups = ParamGroups(params)
    schedule = linear_warmup_decay(train.learning_rate, train.warmup_steps, total)
    optimizer = make_optimizer(train, schedule, groups.decay_mask())
    step = pmap_train_step(DistilBertForSequenceClassification(config), groups, optimizer, schedule, devices)
    state = replicate(create_train_state(groups.pack(params), optimizer, seed=0), devices)
    history = []
    for batch in batches:
        state, metrics = step(state, put_batch(batch, devices))
        history.append(unreplicate(metrics))
    return groups.unpack(unreplicate(state.params)), history


@pytest.mark.parametrize("real_rows", [32, 21], ids=["full-batch", "ragged-last-batch"])
def test_one_step_on_8_devices_equals_1_device(real_rows):
    _, config, params = _tiny()
    train = TrainSection(learning_rate=1e-3, warmup_steps=0, weight_decay=0.01)
    batch = _batch(32, real_rows)
    on_8, metrics_8 = _run_steps(config, params, [batch], 8, train, total=10)
    on_1, metrics_1 = _run_steps(config, params, [batch], 1, train, total=10)
    for a, b in zip(jax.tree_util.tree_leaves(on_8), jax.tree_util.tree_leaves(on_1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert metrics_8[0]["examples"] == metrics_1[0]["examples"] == real_rows
    assert metrics_8[0]["loss"] == pytest.approx(metrics_1[0]["loss"], abs=1e-6)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(on_1), jax.tree_util.tree_leaves(params)))
    assert moved > 1e-4  # the step really changed the weights


def _torch_reference_steps(hf, batches, train, total):
    """transformers model + torch AdamW (bias/LayerNorm without decay) + clip + the HF linear schedule."""
    decay = [p for n, p in hf.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n)]
    no_decay = [p for n, p in hf.named_parameters() if n.endswith(".bias") or "LayerNorm" in n or "layer_norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train.learning_rate, betas=(train.adam_b1, train.adam_b2), eps=train.adam_eps)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, train.warmup_steps, total)
    hf.train()
    for batch in batches:
        real = batch["weights"] > 0
        out = hf(input_ids=torch.as_tensor(batch["input_ids"][real]).long(),
                 attention_mask=torch.as_tensor(batch["attention_mask"][real]).long(),
                 labels=torch.as_tensor(batch["labels"][real]).long())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def test_train_steps_equal_pytorch_adamw_clip_and_schedule():
    hf, config, params = _tiny(seed=3)
    train = TrainSection(learning_rate=5e-3, warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0)
    batches = [_batch(16, 16, seed=s) for s in range(3)] + [_batch(16, 9, seed=9)]
    ours, _ = _run_steps(config, params, batches, 8, train, total=10)
    reference = _torch_reference_steps(hf, batches, train, total=10)
    expected, _ = state_dict_to_params(reference, config, "distilbert")
    for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(ours),
                            zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(expected))):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=jax.tree_util.keystr(path[0]))
    start = jax.tree_util.tree_leaves(params)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(ours), start)) > 1e-3


def test_dropout_keys_differ_per_device_and_per_step():
    devices = jax.devices()[:8]
    keys = jax.pmap(lambda step: jax.lax.all_gather(dropout_key(jax.random.PRNGKey(0), step), AXIS),
                    axis_name=AXIS, devices=devices)
    at_0 = np.asarray(keys(np.zeros(8, np.int32)))[0]
    at_1 = np.asarray(keys(np.ones(8, np.int32)))[0]
    assert len({tuple(k) for k in at_0}) == 8 and len({tuple(k) for k in at_1}) == 8
    assert not {tuple(k) for k in at_0} & {tuple(k) for k in at_1}


def test_batch_that_does_not_divide_over_devices_is_a_clear_error():
    with pytest.raises(ConfigError, match="the batch's rows=30 does not divide evenly over 8 devices"):
        put_batch(_batch(30, 30), jax.devices()[:8])


def test_parameter_groups_stack_alike_tensors_round_trip_and_decay_as_pytorch_groups():
    _, _, params = _tiny()
    groups = ParamGroups(params, "bfloat16")
    packed = groups.pack(params)
    assert sum(x.size for x in packed.values()) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert len(packed) < len(jax.tree_util.tree_leaves(params)) / 3  # 36 tensors of the tiny model in 9 groups
    for a, b in zip(jax.tree_util.tree_leaves(groups.unpack(packed)), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    decayed = groups.decay_mask()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        torch_decays = not (name.endswith("'bias']") or "LayerNorm" in name or "layer_norm" in name)  # torch's groups, above
        (group,) = [g for g, indices, _, _ in groups.groups
                    if any(jax.tree_util.keystr(p) == name for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params))
                           if i in indices)]
        assert decayed[group] == torch_decays, name
    viewed = jax.jit(groups.view)(packed)
    for path, leaf in jax.tree_util.tree_leaves_with_path(viewed):
        name = jax.tree_util.keystr(path)
        assert leaf.dtype == (np.float32 if "LayerNorm" in name or "layer_norm" in name else jax.numpy.bfloat16), name
