"""How the pure per-device steps of ``flaxsst.steps`` run on many devices: ``jax.pmap`` over all
local devices (several hosts join through ``jax.distributed``, each passing its own rows of every
global batch), the train state replicated on each device.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxsst.errors import ConfigError
from flaxsst.param_groups import ParamGroups
from flaxsst.steps import AXIS, eval_step, train_step


def initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when the config or ``JAX_COORDINATOR_ADDRESS`` asks for it."""
    dist = config.distributed
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (dist.enabled or address) or jax.distributed.is_initialized():
        return
    kwargs = {}
    if address:
        kwargs = dict(
            coordinator_address=address,
            num_processes=int(os.environ.get("JAX_NUM_PROCESSES", dist.num_processes)),
            process_id=int(os.environ.get("JAX_PROCESS_ID", dist.process_id)),
        )
    jax.distributed.initialize(**kwargs)  # with no arguments JAX detects TPU pods, SLURM, Open MPI


def pmap_train_step(model: nn.Module, groups: ParamGroups, optimizer: optax.GradientTransformation, schedule: Callable,
                    devices: Sequence[jax.Device] | None = None) -> Callable:
    """``train_step`` mapped over ``devices`` (default: all local ones), the state donated."""
    step = functools.partial(train_step, model=model, groups=groups, optimizer=optimizer, schedule=schedule)
    return jax.pmap(step, axis_name=AXIS, devices=devices, donate_argnums=(0,))


def pmap_eval_step(model: nn.Module, groups: ParamGroups, devices: Sequence[jax.Device] | None = None) -> Callable:
    return jax.pmap(functools.partial(eval_step, model=model, groups=groups), axis_name=AXIS, devices=devices)


def check_divisible(rows: int, n_devices: int, what: str) -> None:
    """A batch must split evenly over the devices: ``ConfigError`` naming ``what`` otherwise."""
    if rows % n_devices:
        raise ConfigError(f"{what}={rows} does not divide evenly over {n_devices} devices; use a multiple of {n_devices}")


def _put(stacked: Any, devices: Sequence[jax.Device] | None) -> Any:
    """Host arrays with a leading axis of one slice per local device -> slice i on device i. Across
    several processes the host copies are returned as they are and ``pmap`` places them."""
    if jax.process_count() > 1:
        return stacked
    devices = list(devices or jax.local_devices())
    return jax.device_put(stacked, NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS)))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """A copy of ``tree`` (host values) on each device, stacked on a leading axis as ``pmap`` takes it."""
    n = len(devices) if devices else jax.local_device_count()
    return _put(jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x))), tree), devices)


def put_batch(rows: dict, devices: Sequence[jax.Device] | None = None) -> dict:
    """This process's rows of a global batch ``[rows, ...]`` -> ``[devices, rows/devices, ...]`` on
    the devices (the trainer calls this in its prefetch thread, so the copies overlap the running step)."""
    n = len(devices) if devices else jax.local_device_count()
    count = len(next(iter(rows.values())))
    check_divisible(count, n, "the batch's rows")
    return _put({k: v.reshape(n, count // n, *v.shape[1:]) for k, v in rows.items()}, devices)


def unreplicate(tree: Any) -> Any:
    """The first local device's copy as host numpy (host copies, as ``replicate`` leaves them across
    processes, are taken as they are)."""
    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return jax.tree_util.tree_map(first, tree)


def gather_rows(x: jax.Array) -> np.ndarray:
    """An eval output ``[devices, rows/devices, ...]`` -> numpy ``[global rows, ...]`` in global batch
    order, on every process."""
    local = np.asarray(x).reshape(-1, *x.shape[2:])
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.concatenate(list(multihost_utils.process_allgather(local)))
