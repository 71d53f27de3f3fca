"""Meshes, logical-axis rules, shardings, and host-local <-> global arrays.

One mesh with axes (`data`, `fsdp`, `expert`, `tensor`) serves every job, from one CPU to a TPU pod slice.
Parameters and activations carry logical axis names; the config's rule table maps them onto mesh
axes. Axes are `AxisType.Auto` because Linen's logical constraints are sharding *hints* that the
default Explicit axes reject.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llada_jax.config import mesh_shape

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Set to 1 by launch/tpu_pod.py on every worker of a pod: this process is one of several.
DISTRIBUTED_ENV = "LLADA_JAX_DISTRIBUTED"
BATCH_AXES = ("data", "fsdp", "expert")


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when this process is one of several.

    On a TPU-VM pod `launch/tpu_pod.py` sets LLADA_JAX_DISTRIBUTED=1 and JAX finds the other
    workers from the TPU metadata server itself (plain TPU VMs do not set TPU_WORKER_HOSTNAMES,
    which only Kubernetes does; both are accepted). Elsewhere the standard
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables are used.
    """
    if jax.distributed.is_initialized():
        return
    many_tpu_hosts = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if os.environ.get(DISTRIBUTED_ENV) == "1" or many_tpu_hosts:
        jax.distributed.initialize()
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh of `config.mesh` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The rule table of the config as the tuple-of-pairs Linen expects."""
    rules = []
    for rule in config.mesh.logical_axis_rules:
        name, target = rule[0], rule[1]
        rules.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(rules)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules) -> Any:
    """A tree of logical PartitionSpecs (or boxed params) -> NamedShardings on `mesh`."""
    specs = nn.get_partition_spec(logical_tree) if not _is_spec_tree(logical_tree) else logical_tree
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _is_spec_tree(tree: Any) -> bool:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
    return bool(leaves) and all(isinstance(x, P) for x in leaves)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch arrays (this process's rows) -> global arrays sharded over the batch axes.

    Every process passes its own slice of the global batch (leading axis); with one process this
    is a plain device_put with the batch sharding.
    """
    out = {}
    for name, value in host_batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def per_host_batch_size(global_batch_size: int) -> int:
    """Rows of the global batch that this process loads."""
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch_size} must be a multiple of the "
                         f"number of processes ({jax.process_count()})")
    return global_batch_size // jax.process_count()
