"""Meshes, logical-axis rules, shardings, and host-local <-> global arrays.

One mesh with axes (`data`, `fsdp`, `expert`, `tensor`) serves every job, from one CPU to a TPU
pod slice: `make_mesh` builds it from a config's `mesh` section or from plain axis sizes, and
`validate_mesh` checks a config against the devices (the device-dependent part of validation).
Parameters and activations carry logical axis names; the config's rule table maps them onto mesh
axes (`logical_rules`, built once per program and passed on). Axes are `AxisType.Auto` because
Linen's logical constraints are sharding *hints* that the default Explicit axes reject.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llada_jax.config import MESH_AXIS_DEFAULTS, check_fields, fail, model_config

MESH_AXES = tuple(MESH_AXIS_DEFAULTS)  # data, fsdp, expert, tensor
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


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, expert, tensor) of `sizes` (a `mesh` section or a dict; a missing axis has
    its default size) with a -1 axis filled so that the product is `num_devices`.

    Errors about the product name the axes with their values (`expert` only when it is not 1):
    the culprit is whichever axis the user set, which this function cannot know (fsdp is -1 by
    default). Configs saved before the expert axis existed have expert 1.
    """
    sizes = {axis: sizes.get(axis, default) for axis, default in MESH_AXIS_DEFAULTS.items()}
    named = {k: v for k, v in sizes.items() if k != "expert" or v != 1}
    shown = ", ".join(f"mesh.{k}={v}" for k, v in named.items())
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"config.mesh.{k}: expected a positive integer or -1, found {v!r}")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1 (take the devices left "
                         f"over), found {shown}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            set_axes = " * ".join(f"{k}={v}" for k, v in named.items() if v != -1)
            raise ValueError(f"config.mesh: {set_axes} = {known} does not divide the "
                             f"{num_devices} devices (mesh.{fill[0]}=-1 takes the rest); "
                             f"found {shown}")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"config.mesh: {' * '.join(named)} = {known} must equal the "
                         f"{num_devices} devices; found {shown}")
    return sizes["data"], sizes["fsdp"], sizes["expert"], sizes["tensor"]


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks what of a config depends on the devices: the mesh sizes fit `num_devices`, the
    global batch splits over the batch axes and micro-batches, the tensor axis divides the sharded
    model dimensions. Raises ValueError naming the field."""
    data, fsdp, expert, tensor = mesh_shape(config.mesh, num_devices)
    t, m = config.train, model_config(config)
    axes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert,
            "train.grad_accum_steps": t.grad_accum_steps}
    if expert == 1:
        del axes["mesh.expert"]
    multiple = math.prod(axes.values())
    if t.batch_size % multiple:
        fail("train.batch_size", f"a multiple of {' * '.join(axes)} = "
             f"{' * '.join(map(str, axes.values()))} = {multiple}", t.batch_size)
    check_fields("config.model.{}", m, (
        ("num_experts", (lambda v: v and v % expert, f"a multiple of mesh.expert={expert}")),
        ("n_heads n_kv_heads mlp_hidden_size vocab_size"
         + (" expert_mlp_hidden_size" if m.num_experts else ""),
         (lambda v: v % tensor, f"a multiple of mesh.tensor={tensor}")),
    ))


def make_mesh(config: ml_collections.ConfigDict | None = None,
              devices: Sequence[jax.Device] | None = None, **sizes: int) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: all), of `config.mesh`
    or of plain axis sizes: `make_mesh(fsdp=-1, tensor=2)` (an axis not named has its default
    size: fsdp -1, the others 1). Size errors are `mesh_shape`'s."""
    if config is not None and sizes:
        raise TypeError("make_mesh: pass a config or axis sizes, not both")
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise TypeError(f"make_mesh: unknown mesh axes {unknown}; the axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes if config is None else config.mesh, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The rule table of the config as the tuple-of-pairs Linen expects."""
    return tuple((name, tuple(target) if isinstance(target, (list, tuple)) else target)
                 for name, target, *_ in config.mesh.logical_axis_rules)


def logical_to_sharding(boxed: Any, mesh: Mesh, rules) -> Any:
    """Params in their logical partitioning boxes (`nn.LogicallyPartitioned`, abstract or
    not) -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


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
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)),
                                                         np.asarray(value))
            for name, value in host_batch.items()}

