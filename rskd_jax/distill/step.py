"""The sharded distillation (and SFT) train step: one jit-compiled `(state, batch, rng) -> (state, metrics)`.

Per step, for each micro-batch (gradient accumulation is a `lax.scan` over micro-batches), `compute_loss` runs
the parts `parts.step_parts(spec)` selects:
1. rollout (no gradient): teacher-mixed sampling from the current student (forwards.rollout, rollout.py);
2. the response view: student forward over prompt + sampled response, the teacher's response states from the
   rollout (prefix reuse) or its own forward (forwards.response_views); `terms.rollout_terms`:
   - single-step reverse KL  sum_v q (log q - log p)               (MiniLLM `_reg_loss`, weight `rkl`)
   - long-term policy gradient with length-normalised returns,
     importance weights and PPO clipping                           (MiniLLM `_pg_loss`, weight `pg`)
3. the ground-truth view: teacher + student over the ground-truth conversation (forwards.gt_views; packed with
   the response view into one forward when `loss.pack_views`); `terms.gt_terms` and `terms.feature_terms`:
   - SFT cross-entropy on the answer tokens                         (weight `sft`)
   - forward KL to the teacher on the answer tokens                 (MiniLLM L_PT's KD part, weight `fkl`)
   - feature alignment, image tokens and answer tokens averaged
     separately, through learned student->teacher width maps      (weights `feat_image`, `feat_text`,
                                                                     `feat_proj` on projected image tokens)
4. clip + AdamW update of the trainable subset only (full student, LoRA, or a regex), alignment maps included
   (optim.py). A step whose loss or gradients are not finite is skipped (state unchanged) and reported in
   `metrics["skipped"]`.

The step spec is spec.py, the state and feature maps state.py, the shardings shard.py.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rskd_jax.distill import forwards as FW
from rskd_jax.distill import terms as TM
from rskd_jax.distill.checks import check_feature_terms
from rskd_jax.distill.optim import make_optimizer, path_str, trainable_filter
from rskd_jax.distill.parts import StepParts, step_parts
from rskd_jax.distill.shard import shardings
from rskd_jax.distill.spec import StepSpec, sft_spec, spec_from_config
from rskd_jax.distill.state import StudentWithMaps, TrainState, feature_maps_for, maps_for_spec

__all__ = [  # re-exported: the step's public names live in their own files
    "DROPOUT_STREAM",
    "StepParts",
    "StepSpec",
    "StudentWithMaps",
    "TrainState",
    "compute_loss",
    "feature_maps_for",
    "make_distill_step",
    "make_optimizer",
    "make_sft_step",
    "make_train_step",
    "maps_for_spec",
    "path_str",
    "sft_spec",
    "shardings",
    "spec_from_config",
    "step_parts",
    "trainable_filter",
]

DROPOUT_STREAM = 0x44524F50  # fold_in constant: the LoRA-dropout key, derived from the step's RNG


def compute_loss(student: StudentWithMaps, teacher, batch: dict, rng, spec: StepSpec):
    """Total weighted loss and metrics for one micro-batch. `teacher` may be None for SFT.

    `rng` drives the rollout's sampling and, through `fold_in(rng, DROPOUT_STREAM)`, the LoRA dropout of the
    student's training forwards (the only place dropout is active: the rollout, the teacher, evaluation and
    export run without it). Both derive from the step's RNG in the train state, so a resumed run is exact."""
    model, parts = student.model, step_parts(spec, teacher is not None)
    drop = jax.random.fold_in(rng, DROPOUT_STREAM)
    sv, tv = FW.vision_features(teacher, batch, parts)
    metrics, losses = {}, []
    views = FW.Views(None, None, None, None)
    if parts.rollout:
        ro = FW.rollout(model, teacher, batch, rng, spec, parts, sv, tv)
        views, view_metrics = FW.response_views(model, teacher, batch, ro, spec, parts, sv, tv, drop)
        rollout_losses, rollout_metrics = TM.rollout_terms(
            model, teacher, ro, views.s_resp, views.t_resp, spec, parts
        )
        metrics.update(view_metrics)
        losses += rollout_losses
    if parts.gt:
        views = FW.gt_views(model, teacher, batch, views, parts, sv, tv, drop)
        losses += TM.gt_terms(model, teacher, batch, views.s_gt, views.t_gt, spec, parts)
        losses += TM.feature_terms(student.maps, batch, views.s_gt, views.t_gt, spec, parts)
    total = jnp.float32(0.0)
    for name, weight, value in losses:
        metrics[name] = value
        total += weight * value
    if parts.rollout:
        metrics.update(rollout_metrics)
    metrics["loss/total"] = total
    return total, metrics


# ----------------------------------------------------------------------------------------------- the step
def _split(student: StudentWithMaps, teacher, spec: StepSpec, trainable: str) -> dict:
    """graphdef / params / frozen (student) and teacher_graphdef / teacher, with the trainable subset checked."""
    graphdef, params, frozen = nnx.split(student, trainable_filter(trainable), ...)
    t_graphdef, t_state = nnx.split(teacher) if teacher is not None else (None, None)
    if len(jax.tree.leaves(params)) == 0:
        raise ValueError(f"trainable={trainable!r} selects no parameter of the student")
    if teacher is not None:  # a feature term that would only train its discarded map is refused
        paths = [path_str(p) for p, _ in nnx.to_flat_state(params)]
        check_feature_terms(spec.weights, paths, trainable, spec.shared_vision)
    return dict(graphdef=graphdef, params=params, frozen=frozen, teacher_graphdef=t_graphdef, teacher=t_state)


def _update(tx, state: TrainState, rng, loss, metrics, grads):
    """The optimizer update, skipped (state unchanged but for step and rng) when loss or gradients are not finite."""
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=pick(new_params, state.params),
        opt_state=pick(new_opt, state.opt_state),
        rng=rng,
    )
    return new_state, dict(metrics, grad_norm=gnorm, skipped=(~finite).astype(jnp.float32))


def make_train_step(
    student: StudentWithMaps,
    teacher,
    spec: StepSpec,
    tx: optax.GradientTransformation,
    trainable: str = "all",
    *,
    mesh=None,
    donate: bool = True,
    donate_params: bool = False,
):
    """Builds `(init, step, parts)` for a `StudentWithMaps` (+ an optional frozen teacher).

    init: (params, rng_key) -> TrainState, where params = parts["params"] (the trainable subset).
    step: (state, frozen_student_state, teacher_state, batch) -> (state, metrics), jit-compiled. With a `mesh`, every
      input and output has an explicit sharding from the logical-axis rules (rskd_jax.parallel.rules): parameters and
      optimizer moments per the weight annotations, the batch over (data, fsdp); the state is donated.
    parts: graphdef / params / frozen (student) and teacher_graphdef / teacher (states), for checkpointing and export.
    """
    parts = _split(student, teacher, spec, trainable)
    graphdef, t_graphdef = parts["graphdef"], parts["teacher_graphdef"]

    def init_fn(p, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng)

    def loss_fn(p, fz, ts, mb, rng):
        st = nnx.merge(graphdef, p, fz)
        te = nnx.merge(t_graphdef, ts) if t_graphdef is not None else None
        return compute_loss(st, te, mb, rng, spec)

    sh = shardings(tx, parts, mesh) if mesh is not None else None
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(*args):
        """Gradients leave the backward pass sharded like their parameters (not replicated)."""
        out, grads = value_and_grad(*args)
        if sh is not None:
            grads = jax.lax.with_sharding_constraint(grads, sh["params"])
        return out, grads

    def step_fn(state: TrainState, fz, ts, batch):
        rng, step_rng = jax.random.split(state.rng)
        k = spec.grad_accum
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, fz, ts, batch, step_rng)
        else:
            (loss, metrics), grads = _accumulate(grad_fn, state.params, fz, ts, batch, step_rng, k)
        return _update(tx, state, rng, loss, metrics, grads)

    donate_kw = dict(donate_argnums=(0,) if donate else ())
    if mesh is None:
        return init_fn, jax.jit(step_fn, **donate_kw), parts
    parts["shardings"] = sh
    init = jax.jit(  # donate_params: the state takes over the trainable arrays (no second copy)
        init_fn,
        in_shardings=(sh["params"], sh["replicated"]),
        out_shardings=sh["state"],
        donate_argnums=(0,) if donate_params else (),
    )
    step = jax.jit(
        step_fn,
        in_shardings=(sh["state"], sh["frozen"], sh["teacher"], sh["batch"]),
        out_shardings=(sh["state"], sh["replicated"]),
        **donate_kw,
    )
    return init, step, parts


def _accumulate(grad_fn, params, fz, ts, batch, rng, k):
    """Gradient accumulation: mean of value_and_grad over k micro-batches (a lax.scan; one rollout each)."""
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
    rngs = jax.random.split(rng, k)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, m_shape), _ = jax.eval_shape(grad_fn, params, fz, ts, first, rngs[0])
    zeros = (
        jax.tree.map(jnp.zeros_like, params),
        jnp.float32(0.0),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape),
    )

    def body(carry, xs):
        (loss, m), g = grad_fn(params, fz, ts, *xs)
        return jax.tree.map(jnp.add, carry, (g, loss, m)), None

    (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (micro, rngs))
    return (loss / k, jax.tree.map(lambda m: m / k, metrics)), jax.tree.map(lambda g: g / k, grads)


def make_distill_step(config, mesh, student, teacher, *, maps=None, donate: bool = True):
    """The step a `configs/distill.py` config describes: `(init, step, parts)` as in `make_train_step`.

    `student` is the student LlavaModel, `teacher` the frozen teacher; `maps` the feature maps (default: built from
    the config's feature layers when the widths differ)."""
    spec = spec_from_config(config, student.cfg)
    packed_models = [("student", student.cfg)]
    if not spec.reuse_teacher_prefix:  # with the reuse the teacher runs no packed forward
        packed_models.append(("teacher", teacher.cfg))
    splash = [m for m, c in packed_models if c.attention_impl.startswith("splash")]
    if spec.pack_views and spec.needs_rollout and splash:
        logging.warning(
            "loss.pack_views=True: the packed forward of the %s runs XLA attention, not the splash kernel "
            "(its mask is per-row); set loss.pack_views=False to keep splash for two separate forwards",
            " and ".join(splash),
        )
    if maps is None:
        maps = maps_for_spec(spec, student.cfg, teacher.cfg, nnx.Rngs(config.seed + 7))
    return make_train_step(
        StudentWithMaps(student, maps),
        teacher,
        spec,
        make_optimizer(config.optim),
        config.trainable,
        mesh=mesh,
        donate=donate,
    )


def make_sft_step(config, mesh, model, *, trainable: str | None = None, donate: bool = True):
    """Supervised fine-tuning (teacher or baseline student): cross-entropy on the answer tokens only."""
    return make_train_step(
        StudentWithMaps(model),
        None,
        sft_spec(config, model.cfg),
        make_optimizer(config.optim),
        trainable or config.trainable,
        mesh=mesh,
        donate=donate,
    )
