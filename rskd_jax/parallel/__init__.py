"""Mesh construction and the logical-axis sharding rules (one table, in rules.py)."""

from rskd_jax.parallel.mesh import AXES, batch_sharding, make_mesh, shard_batch
from rskd_jax.parallel.rules import (
    RULES,
    constrain,
    init_sharded,
    logical_to_spec,
    named_shardings,
    partition_specs,
    shard_model,
)

__all__ = [
    "AXES",
    "batch_sharding",
    "make_mesh",
    "shard_batch",
    "RULES",
    "constrain",
    "init_sharded",
    "logical_to_spec",
    "named_shardings",
    "partition_specs",
    "shard_model",
]
