"""How the pure per-device steps of ``flaxsst.steps`` run on many devices: ``jax.pmap`` over all
local devices (several hosts join through ``jax.distributed``), the train state replicated per
device, and each process's rows of a global batch split over its devices.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxsst.steps import AXIS, TREE, TreeLayout, eval_step, train_step


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when the config or ``JAX_COORDINATOR_ADDRESS`` asks for it."""
    dist = config.distributed
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (dist.enabled or address):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if address:
        kwargs = dict(
            coordinator_address=address,
            num_processes=int(os.environ.get("JAX_NUM_PROCESSES", dist.num_processes)),
            process_id=int(os.environ.get("JAX_PROCESS_ID", dist.process_id)),
        )
    jax.distributed.initialize(**kwargs)  # with no arguments JAX detects TPU pods, SLURM, Open MPI


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
