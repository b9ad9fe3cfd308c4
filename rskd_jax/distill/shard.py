"""Explicit shardings of everything the train step takes and returns, from the logical-axis rules."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rskd_jax.distill.state import TrainState
from rskd_jax.parallel import rules


def shardings(tx, parts, mesh) -> dict:
    """Explicit shardings of everything the step takes and returns, from the logical-axis rules.

    Adam moments (and any other parameter-shaped optimizer state) take their parameter's sharding; counters are
    replicated. Nothing is allocated."""

    repl = NamedSharding(mesh, P())
    flat, treedef = jax.tree_util.tree_flatten_with_path(parts["params"])
    leaves_sh = jax.tree.leaves(rules.named_shardings(parts["params"], mesh))
    p_sh = jax.tree.unflatten(treedef, leaves_sh)
    by_path = {tuple(path): (sh, tuple(x.shape)) for (path, x), sh in zip(flat, leaves_sh)}

    def opt_leaf(path, x):  # optimizer-state leaves end with their parameter's path (mu/..., nu/...)
        path = tuple(path)
        for i in range(len(path)):
            hit = by_path.get(path[i:])
            if hit is not None and hit[1] == tuple(x.shape):
                return hit[0]
        return repl

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(tx.init, parts["params"]))
    return dict(
        params=p_sh,
        state=TrainState(step=repl, params=p_sh, opt_state=opt_sh, rng=repl),
        replicated=repl,
        frozen=rules.named_shardings(parts["frozen"], mesh),
        teacher=rules.named_shardings(parts["teacher"], mesh) if parts["teacher"] is not None else None,
        batch=NamedSharding(mesh, P(("data", "fsdp"))),
    )  # a prefix for every [B, ...] batch array
