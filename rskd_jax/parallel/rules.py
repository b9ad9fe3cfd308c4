"""The one logical-axis -> mesh-axis table, and the functions that turn logical names into shardings.

Model weights carry logical names in their nnx metadata (`out_sharding`, e.g. ('layers', 'embed', 'mlp'));
activations are annotated with `constrain(x, ('batch', 'seq', 'embed'))`. This module maps both onto a
mesh with axes (data, fsdp, tensor):

* a mesh axis is used at most once per array: first dimension wins (so the residual stream
  ('batch', 'seq', 'embed') shards batch over (data, fsdp) and leaves embed whole);
* a mesh axis that does not divide the dimension is dropped (tiny test models, odd vocab sizes);
* names not in the table are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rskd_jax.parallel import place

Rules = tuple[tuple[str, Any], ...]

RULES: Rules = (
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None, rules: Rules | None = None
) -> P:
    """PartitionSpec for an array with logical axis `names` (see the module docstring for the policy)."""
    table = dict(rules if rules is not None else RULES)
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        keep = []
        for ax in axes:
            if ax in used or (mesh is not None and ax not in sizes):
                continue
            if shape is not None and sizes and shape[i] % (math.prod(sizes[a] for a in keep) * sizes[ax]):
                continue
            keep.append(ax)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names when a mesh is set (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def _var_names(v: nnx.Variable):
    names = v.get_metadata().get("out_sharding")
    return names if names is not None else (None,) * len(v.shape)


def partition_specs(state, mesh=None, rules: Rules | None = None):
    """PartitionSpecs (same tree as `state`, concrete or abstract) from the weights' logical names."""
    return jax.tree.map(
        lambda v: logical_to_spec(_var_names(v), v.shape, mesh, rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def named_shardings(state, mesh, rules: Rules | None = None):
    """NamedShardings for an nnx State (concrete or from nnx.eval_shape), tree-matching `state`'s leaves."""
    return jax.tree.map(
        lambda v: NamedSharding(mesh, logical_to_spec(_var_names(v), v.shape, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh, rules: Rules | None = None) -> nnx.Module:
    """Lays a model's variables out on `mesh` per the rules; in place. Variables already in their sharding
    (models from `init_sharded` / `load_pretrained(mesh=...)`) are left alone; others are moved one at a time,
    also onto meshes spanning several processes (each process places its own shards)."""

    state = nnx.state(model)
    shardings = named_shardings(state, mesh, rules)

    def move(x, s):
        if place.is_placed(x, s):
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable and s.is_fully_addressable:
            return jax.device_put(x, s)
        return place.put(np.asarray(jax.device_get(x)), s)

    moved = jax.tree.map(
        lambda v, s: v.replace(move(v.get_value(), s)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(model, moved)
    return model


def init_sharded(make_model, mesh, rules: Rules | None = None) -> nnx.Module:
    """Builds `make_model()` directly sharded (each device allocates only its shards): for big models."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abs_state = nnx.split(abstract)
    shardings = named_shardings(abs_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
