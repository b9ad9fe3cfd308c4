"""Where a distillation loss pushes the student: per-term gradients at one batch (docs/results.md analysis).

`term_gradients(config, student, teacher, batch)` evaluates each weighted term of the config's loss ALONE
(weight 1, the same rollout key for every term) at the student's current weights, and returns its value,
the global norm of its gradient on the student's weights (feature maps excluded) and the cosine of that
gradient with the SFT term's and with the weighted total's. Used like this on the demo's start models:

    from rskd_jax.train import compare as C, run as R
    teacher, student = C.start_models(ctx)
    batch = next(iter(R.dataset_for(ctx, student.cfg, C.data_seed(ctx.config, 0))))
    term_gradients(C.method_config(ctx.config, "full"), student, teacher, batch)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rskd_jax.distill import step as S


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def term_gradients(config, student, teacher, batch: dict, seed: int = 0, vectors: bool = False) -> dict:
    spec = S.spec_from_config(config, student.cfg)
    maps = S.maps_for_spec(spec, student.cfg, teacher.cfg, nnx.Rngs(config.seed + 7))
    graphdef, params, frozen = nnx.split(
        S.StudentWithMaps(student, maps), S.trainable_filter(config.trainable), ...
    )
    t_graphdef, t_state = nnx.split(teacher)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.key(seed)
    terms = [k for k in spec.weights if spec.w(k) > 0]
    flat = {}
    out = {}
    for name in [*terms, "total"]:
        sp = spec if name == "total" else dataclasses.replace(spec, weights={name: 1.0})

        def loss(p, sp=sp):
            st = nnx.merge(graphdef, p, frozen)
            return S.compute_loss(st, nnx.merge(t_graphdef, t_state), batch, rng, sp)

        (value, metrics), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        flat[name] = _flat(g["model"])
        out[name] = dict(value=float(value), grad_norm=float(jnp.linalg.norm(flat[name])))
        if name == "total":
            out[name].update(
                {k: float(v) for k, v in metrics.items() if k.startswith("rollout/")},
            )
    cos = lambda a, b: float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
    for name in out:
        if "sft" in flat:
            out[name]["cos_sft"] = cos(flat[name], flat["sft"])
        out[name]["cos_total"] = cos(flat[name], flat["total"])
    if vectors:  # the flattened gradients themselves (tests)
        out["vectors"] = flat
    return out
