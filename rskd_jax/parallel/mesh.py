"""Device mesh (data, fsdp, tensor) with Auto axis types, and batch sharding helpers.

Auto (GSPMD-style) axes: `jax.make_mesh` defaults to Explicit axes in jax 0.10, which rejects
`with_sharding_constraint`; the model code relies on Auto. Use the mesh with `with jax.set_mesh(mesh):`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Mesh of shape (data, fsdp, tensor); one entry may be -1 (filled from the device count)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must be (data, fsdp, tensor), got {tuple(shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one -1 in the mesh shape, got {tuple(shape)}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices do not fill mesh shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}"
        )
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """Puts every array of a (single-process) batch pytree on `mesh`, batch dimension over (data, fsdp).

    The batch size must be divisible by data*fsdp. Multi-host input goes through
    `jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)` instead (the trainer's job).
    """
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by data*fsdp={n}")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)
