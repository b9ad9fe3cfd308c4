"""The sharded distillation (and SFT) train step: one jit-compiled `(state, batch, rng) -> (state, metrics)`.

Per step, for each micro-batch (gradient accumulation is a `lax.scan` over micro-batches):
1. rollout (no gradient): teacher-mixed sampling from the current student (rollout.py);
2. teacher forward (frozen, no gradient) and student forward over prompt + sampled response; the vocabulary-sized
   terms are computed only at response positions:
   - single-step reverse KL  sum_v q (log q - log p)               (MiniLLM `_reg_loss`, weight `rkl`)
   - long-term policy gradient with length-normalised returns,
     importance weights and PPO clipping                           (MiniLLM `_pg_loss`, weight `pg`)
3. teacher + student forward over the ground-truth conversation (only when a term below has a weight):
   - SFT cross-entropy on the answer tokens                         (weight `sft`)
   - forward KL to the teacher on the answer tokens                 (MiniLLM L_PT's KD part, weight `fkl`)
   - feature alignment, image tokens and answer tokens averaged
     separately, through learned student->teacher width maps      (weights `feat_image`, `feat_text`,
                                                                     `feat_proj` on projected image tokens)
4. clip + AdamW update of the trainable subset only (full student, LoRA, or a regex), alignment maps included.
   A step whose loss or gradients are not finite is skipped (state unchanged) and reported in `metrics["skipped"]`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rskd_jax.distill import losses as L
from rskd_jax.distill import prefix as PX
from rskd_jax.distill import rollout as R
from rskd_jax.distill.checks import check_feature_terms
from rskd_jax.models.lora import LoRAParam
from rskd_jax.parallel import rules


# ----------------------------------------------------------------------------------------------- containers
class DistillStudent(nnx.Module):
    """The trainable side: the student model plus the student->teacher feature maps (dropped at export)."""

    def __init__(self, model, maps: dict | None = None):
        self.model = model
        self.maps = nnx.Dict(maps or {})


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable subset of DistillStudent
    opt_state: optax.OptState
    rng: jax.Array


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def trainable_filter(spec: str):
    """nnx filter for the trainable subset of a `DistillStudent` (feature maps are always trainable).

    spec: "all" (every student weight except the frozen CLIP tower), "all+vision", "lora" (LoRA adapters only), or a
    regex searched in the '/'-joined parameter path (big_vision style, e.g. "model/projector/.*").
    """

    def is_map(path):
        return len(path) > 0 and path[0] == "maps"

    if spec == "lora":
        return lambda path, v: isinstance(v, nnx.Param) and (is_map(path) or isinstance(v, LoRAParam))
    if spec in ("all", "all+vision"):
        keep_vision = spec == "all+vision"
        return lambda path, v: (
            isinstance(v, nnx.Param)
            and (is_map(path) or keep_vision or "vision" not in [str(p) for p in path[:2]])
        )
    rx = re.compile(spec)
    return lambda path, v: (
        isinstance(v, nnx.Param) and (is_map(path) or rx.search(path_str(path)) is not None)
    )


def make_optimizer(cfg) -> optax.GradientTransformation:
    """clip-by-global-norm + AdamW with warm-up and cosine/constant/linear decay (MiniLLM: betas .9/.95)."""
    steps = max(int(cfg.total_steps), 1)
    warm = min(int(cfg.get("warmup_steps", 0)), steps - 1)  # a warm-up longer than the run is clamped
    sched_name = cfg.get("schedule", "cosine")
    if sched_name == "cosine":
        sched = optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, max(warm, 1), max(steps, 2), end_value=cfg.lr * cfg.get("end_lr_factor", 0.0)
        )
    elif sched_name == "linear":
        sched = optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.lr, max(warm, 1)),
                optax.linear_schedule(cfg.lr, 0.0, max(steps - warm, 1)),
            ],
            [warm],
        )
    elif sched_name == "constant":
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr)], [warm]
        )
    else:
        raise KeyError(f"config optim.schedule={sched_name!r}: expected cosine, linear or constant")
    return optax.chain(
        optax.clip_by_global_norm(cfg.get("grad_clip", 1.0)),
        optax.adamw(
            sched,
            b1=cfg.get("b1", 0.9),
            b2=cfg.get("b2", 0.95),
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.get("weight_decay", 0.0),
        ),
    )


# ----------------------------------------------------------------------------------------------- loss pieces
def _response_view(prompt_ids, prompt_mask, rollout: R.Rollout):
    """prompt (left-padded) + response -> ids, mask and the R positions whose logits predict the response."""
    ids = jnp.concatenate([prompt_ids, rollout.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), rollout.mask.astype(jnp.int32)], axis=1)
    plen, rlen = prompt_ids.shape[1], rollout.tokens.shape[1]
    return ids, mask, plen - 1 + jnp.arange(rlen)


def _gather_positions(x, pos):
    return jnp.take(x, pos, axis=1)


def _answer_positions(loss_mask):
    """For a right-padded GT batch: logits at t-1 predict token t, so the predicting positions are shifted by one."""
    return jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of one step; built from the ml_collections config by `spec_from_config`."""

    weights: dict
    sampling: R.SamplingConfig
    clip_eps: float = 0.2
    gamma: float = 1.0
    include_current: bool = False
    length_norm: bool = True
    whiten: bool = False
    temperature: float = 1.0
    feature_kind: str = "cosine"
    divergence: str = "rkl"  # the single-step term on sampled responses (L.TOKEN_DIVERGENCES)
    skew_alpha: float = 0.1  # skew_fkl / skew_rkl mixing weight (DistiLLM's 0.1)
    jsd_beta: float = 0.5  # jsd mixture weight (TRL's convention)
    feature_layers: tuple = ()  # ((student_idx, teacher_idx), ...) HF hidden-state indices
    shared_vision: bool = False
    grad_accum: int = 1
    chunk_size: int = 128  # sequence chunk of the vocabulary-sized losses (only [B, chunk, V] logits live)
    pack_views: bool = True  # one forward over [GT | response] instead of two (see _packed_view)
    reuse_teacher_prefix: bool = (
        True  # the teacher's prompt/response states from the rollout (distill/prefix.py)
    )
    eos_id: int = 2
    pad_id: int = 0
    image_token_id: int = 0

    def w(self, name):
        return float(self.weights.get(name, 0.0))

    @property
    def needs_rollout(self):
        return self.w("rkl") > 0 or self.w("pg") > 0

    @property
    def needs_teacher_gt(self):
        return self.w("fkl") > 0 or any(self.w(k) > 0 for k in ("feat_image", "feat_text", "feat_proj"))


def sft_spec(config, model_cfg) -> StepSpec:
    """Cross-entropy on the answer tokens only (teacher / baseline-student fine-tuning)."""
    return StepSpec(
        weights=dict(sft=1.0),
        sampling=None,
        grad_accum=config.optim.get("grad_accum", 1),
        chunk_size=config.loss.get("chunk_size", 128),
        eos_id=model_cfg.eos_token_id,
        pad_id=model_cfg.pad_token_id,
        image_token_id=model_cfg.image_token_id,
    )


def spec_from_config(cfg, model_cfg) -> StepSpec:
    lo, sa = cfg.loss, cfg.sampling
    return StepSpec(
        weights=dict(lo.weights),
        sampling=R.SamplingConfig(
            max_new_tokens=sa.max_new_tokens,
            alpha=sa.alpha,
            temperature=sa.temperature,
            top_k=sa.top_k,
            top_p=sa.top_p,
        ),
        clip_eps=lo.clip_eps,
        gamma=lo.gamma,
        include_current=lo.include_current,
        length_norm=lo.length_norm,
        whiten=lo.whiten,
        temperature=lo.temperature,
        feature_kind=lo.feature_kind,
        divergence=lo.get("divergence", "rkl"),
        skew_alpha=lo.get("skew_alpha", 0.1),
        jsd_beta=lo.get("jsd_beta", 0.5),
        feature_layers=tuple(tuple(p) for p in lo.feature_layers),
        shared_vision=cfg.get("shared_vision", False),
        grad_accum=cfg.optim.get("grad_accum", 1),
        chunk_size=lo.get("chunk_size", 128),
        pack_views=lo.get("pack_views", True),
        reuse_teacher_prefix=lo.get("reuse_teacher_prefix", True),
        eos_id=model_cfg.eos_token_id,
        pad_id=model_cfg.pad_token_id,
        image_token_id=model_cfg.image_token_id,
    )


def _packed_view(batch, ro: R.Rollout):
    """The ground-truth conversation and the sampled response packed into ONE sequence [GT (T) | response (R)].

    The GT view and the response view share their prompt (the rollout's prompt is a prefix of the training
    ids: the data contract), so instead of two forwards over P + R and T tokens, one forward over T + R does
    both: response tokens attend to the GT segment's prompt part (key < prompt length) and to earlier
    response tokens, never to the GT answer; their positions continue from the prompt. Every hidden state is
    the one the two separate forwards give (up to float rounding).

    -> ids [B, T+R], positions [B, T+R], attn_mask bool [B, T+R, T+R], predict [B, R] (the positions whose
    hidden states predict the response tokens) and the fraction of rows whose prompt is NOT a prefix of
    input_ids (should be 0; a metric, since nothing can raise under jit).
    """
    ids, amask = batch["input_ids"], batch["attention_mask"].astype(jnp.int32)
    pids, pmask = batch["prompt_ids"], batch["prompt_mask"].astype(jnp.int32)
    t = ids.shape[1]
    r = ro.tokens.shape[1]
    plen = pmask.sum(1)  # [B]
    rmask = ro.mask.astype(jnp.int32)
    gt_pos = jnp.maximum(jnp.cumsum(amask, 1) - 1, 0)
    resp_pos = plen[:, None] + jnp.maximum(jnp.cumsum(rmask, 1) - 1, 0)
    idx = jnp.arange(t + r)
    valid = jnp.concatenate([amask, rmask], 1).astype(bool)
    causal = idx[None, :] <= idx[:, None]
    in_resp = idx >= t
    # a response query must not see the GT keys past the prompt (the GT answer)
    hidden_answer = (in_resp[:, None] & (idx[None, :] < t))[None] & (
        idx[None, None, :] >= plen[:, None, None]
    )
    mask = valid[:, None, :] & causal[None] & ~hidden_answer
    j = jnp.arange(r)
    predict = jnp.where(j[None] == 0, plen[:, None] - 1, t + j[None] - 1)
    # the prompt (left-padded) must equal input_ids[:plen]
    p = pids.shape[1]
    src = jnp.clip(p - plen[:, None] + jnp.arange(p)[None], 0, p - 1)
    k_valid = jnp.arange(p)[None] < plen[:, None]
    prompt = jnp.take_along_axis(pids, src, axis=1)
    gt_head = ids[:, :p] if t >= p else jnp.pad(ids, ((0, 0), (0, p - t)))
    bad = jnp.any(k_valid & (prompt != gt_head), axis=1).astype(jnp.float32).mean()
    ids_all = jnp.concatenate([ids, ro.tokens], 1)
    return ids_all, jnp.concatenate([gt_pos, resp_pos], 1), mask, predict, bad


DROPOUT_STREAM = 0x44524F50  # fold_in constant: the LoRA-dropout key, derived from the step's RNG


def compute_loss(student: DistillStudent, teacher, batch: dict, rng, spec: StepSpec):
    """Total weighted loss and metrics for one micro-batch. `teacher` may be None for SFT.

    `rng` drives the rollout's sampling and, through `fold_in(rng, DROPOUT_STREAM)`, the LoRA dropout of the
    student's training forwards (the only place dropout is active: the rollout, the teacher, evaluation and
    export run without it). Both derive from the step's RNG in the train state, so a resumed run is exact."""
    model = student.model
    drop = jax.random.fold_in(rng, DROPOUT_STREAM)
    metrics, total = {}, jnp.float32(0.0)
    tv = sv = None
    if spec.shared_vision and teacher is not None and "pixel_values" in batch:
        tv = jax.lax.stop_gradient(teacher.vision_features(batch["pixel_values"]))
        sv = tv
    pix = batch.get("pixel_values")
    gt_terms = [k for k in ("sft", "fkl", "feat_image", "feat_text", "feat_proj") if spec.w(k) > 0]
    s_layers = (
        tuple(p[0] for p in spec.feature_layers)
        if gt_terms and spec.w("feat_image") + spec.w("feat_text")
        else ()
    )
    t_layers = tuple(p[1] for p in spec.feature_layers) if s_layers else ()
    need_t_gt = teacher is not None and spec.needs_teacher_gt
    reuse = spec.reuse_teacher_prefix and teacher is not None  # teacher states from the rollout
    s_gt = t_gt = None  # GT-view outputs, when the packed forward (or the prefix reuse) computed them

    if spec.needs_rollout:
        frozen = jax.lax.stop_gradient
        ro = R.sample(
            frozen_model(model),
            frozen_model(teacher) if teacher is not None else None,
            batch["prompt_ids"],
            batch["prompt_mask"],
            rng,
            spec.sampling,
            eos_id=spec.eos_id,
            pad_id=spec.pad_id,
            pixel_values=pix,
            student_vision_features=sv,
            teacher_vision_features=tv,
            keep_teacher=t_layers if reuse else None,
        )
        ro = jax.tree.map(frozen, ro)
        if reuse and need_t_gt:
            t_gt, metrics["teacher/prefix_fallback"] = _teacher_gt_from_rollout(
                teacher, batch, ro, t_layers, tv, spec
            )

        def response_view(m, vision, dropout_rng=None):  # hidden states predicting the response
            ids, mask, pos = _response_view(batch["prompt_ids"], batch["prompt_mask"], ro)
            out = m(
                ids,
                pix,
                attention_mask=mask,
                vision_features=vision,
                compute_logits=False,
                dropout_rng=dropout_rng,
            )
            return _gather_positions(out.last_hidden, pos)

        if gt_terms and spec.pack_views:
            ids, positions, amask, pos, bad = _packed_view(batch, ro)
            metrics["data/prompt_not_prefix"] = bad
            t_len = batch["input_ids"].shape[1]
            kw = dict(positions=positions, attn_mask=amask, compute_logits=False)
            gather = lambda out: jnp.take_along_axis(out.last_hidden, pos[..., None], axis=1)
            head = lambda out: out.replace(
                last_hidden=out.last_hidden[:, :t_len],
                hidden_states={i: x[:, :t_len] for i, x in out.hidden_states.items()},
            )
            s_all = model(ids, pix, vision_features=sv, return_hidden=s_layers, dropout_rng=drop, **kw)
            s_resp, s_gt = gather(s_all), head(s_all)
            if reuse:  # the rollout computed the teacher's response states
                t_resp = ro.teacher_states.response
            elif need_t_gt:  # the teacher packed as well
                t_all = frozen(teacher(ids, pix, vision_features=tv, return_hidden=t_layers, **kw))
                t_resp, t_gt = gather(t_all), head(t_all)
            else:  # the teacher is needed on the response view only
                t_resp = frozen(response_view(teacher, tv))
        else:
            s_resp = response_view(model, sv, drop)
            t_resp = ro.teacher_states.response if reuse else frozen(response_view(teacher, tv))
        rmask = ro.mask
        rewards = (ro.teacher_logprobs - ro.student_logprobs) * rmask
        adv = jax.lax.stop_gradient(
            L.long_term_advantages(
                rewards,
                rmask,
                gamma=spec.gamma,
                include_current=spec.include_current,
                length_norm=spec.length_norm,
                whiten=spec.whiten,
            )
        )
        tau, clip = spec.temperature, spec.clip_eps
        single_step = L.token_divergence(spec.divergence, skew_alpha=spec.skew_alpha, jsd_beta=spec.jsd_beta)

        def per_token(s_lg, t_lg, tok, old, a, w):
            s_lg, t_lg = s_lg / tau, t_lg / tau
            return dict(
                rkl=single_step(s_lg, t_lg),
                pg=L.policy_gradient_per_token(L.token_logprobs(s_lg, tok), old, a, w, clip),
            )

        terms, _ = L.chunked_token_loss(
            s_resp,
            t_resp,
            model.logits,
            teacher.logits,
            rmask,
            per_token,
            spec.chunk_size,
            token_args=(ro.tokens, ro.student_logprobs, adv, ro.weights),
        )
        for name in ("rkl", "pg"):
            if spec.w(name) > 0:
                metrics[f"loss/{name}"] = terms[name]
                total += spec.w(name) * terms[name]
        n = jnp.maximum(rmask.sum(), 1.0)
        metrics["rollout/rev_kl_k3"] = L.k3_reverse_kl_estimate(
            ro.teacher_logprobs, ro.student_logprobs, rmask
        )
        metrics["rollout/length"] = ro.lengths.astype(jnp.float32).mean()
        metrics["rollout/iw_mean"] = (ro.weights * rmask).sum() / n
        metrics["rollout/iw_max"] = jnp.max(jnp.where(rmask > 0, ro.weights, -jnp.inf))
        metrics["rollout/iw_min"] = jnp.min(jnp.where(rmask > 0, ro.weights, jnp.inf))

    if gt_terms:
        ids, amask, lmask = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["loss_mask"].astype(jnp.float32),
        )
        if s_gt is not None:  # computed by the packed forward above
            s_out, t_out = s_gt, t_gt
        else:
            s_out = model(
                ids,
                pix,
                attention_mask=amask,
                vision_features=sv,
                compute_logits=False,
                return_hidden=s_layers,
                dropout_rng=drop,
            )
            t_out = t_gt  # from the rollout's teacher states (prefix reuse), or None
            if need_t_gt and t_out is None:
                t_out = jax.lax.stop_gradient(
                    teacher(
                        ids,
                        pix,
                        attention_mask=amask,
                        vision_features=tv,
                        compute_logits=False,
                        return_hidden=t_layers,
                    )
                )
        pred_mask = _answer_positions(lmask)  # positions whose logits predict an answer token
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        tau = spec.temperature
        use_fkl = spec.w("fkl") > 0 and t_out is not None

        def per_token(s_lg, t_lg, tgt):
            out = dict(sft=-L.token_logprobs(s_lg / tau, tgt))
            if use_fkl:
                out["fkl"] = L.forward_kl_per_token(s_lg / tau, t_lg / tau)
            return out

        if spec.w("sft") > 0 or use_fkl:
            terms, _ = L.chunked_token_loss(
                s_out.last_hidden,
                t_out.last_hidden if use_fkl else None,
                model.logits,
                teacher.logits if use_fkl else None,
                pred_mask,
                per_token,
                spec.chunk_size,
                token_args=(targets,),
            )
            for name in ("sft", "fkl"):
                if spec.w(name) > 0 and name in terms:
                    metrics[f"loss/{name}"] = terms[name]
                    total += spec.w(name) * terms[name]
        if t_out is not None:
            image_mask = (ids == spec.image_token_id).astype(jnp.float32) * amask
            for i, (si, ti) in enumerate(spec.feature_layers if s_layers else ()):
                proj = student.maps[f"layer{i}"] if f"layer{i}" in student.maps else None
                groups = L.cross_modal_alignment(
                    s_out.hidden_states[si],
                    t_out.hidden_states[ti],
                    image_mask,
                    lmask,
                    kind=spec.feature_kind,
                    proj=proj,
                )
                for key, wname in (("image", "feat_image"), ("text", "feat_text")):
                    if spec.w(wname) > 0:
                        metrics[f"loss/{wname}/{i}"] = groups[key]
                        total += spec.w(wname) * groups[key]
            if spec.w("feat_proj") > 0 and s_out.image_features is not None:
                proj = student.maps["proj"] if "proj" in student.maps else None
                valid = jnp.ones(s_out.image_features.shape[:2], jnp.float32)
                fp = L.feature_alignment_loss(
                    s_out.image_features, t_out.image_features, valid, kind=spec.feature_kind, proj=proj
                )
                metrics["loss/feat_proj"] = fp
                total += spec.w("feat_proj") * fp
    metrics["loss/total"] = total
    return total, metrics


def _teacher_gt_from_rollout(teacher, batch, ro: R.Rollout, layers, tv, spec: StepSpec):
    """The teacher's ground-truth view from the rollout's prompt states (rskd_jax.distill.prefix), falling
    back to a full forward over `input_ids` -> (LlavaOutput, fell back 0/1)."""

    def full_forward():
        return teacher(
            batch["input_ids"],
            batch.get("pixel_values"),
            attention_mask=batch["attention_mask"],
            vision_features=tv,
            compute_logits=False,
            return_hidden=layers,
        )

    view, fell_back = PX.teacher_gt_view(
        teacher, batch, ro.teacher_states, layers, full_forward, spec.image_token_id
    )
    return jax.lax.stop_gradient(view), fell_back


def frozen_model(model):
    """The same module with every array wrapped in stop_gradient (the rollout never back-propagates)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def maps_for_spec(spec: StepSpec, student_cfg, teacher_cfg, rngs) -> dict:
    """The feature maps a step spec needs (one per aligned layer, + one for projected image tokens)."""
    feat = spec.w("feat_image") + spec.w("feat_text") > 0
    return feature_maps_for(
        spec.feature_layers if feat else (), student_cfg, teacher_cfg, rngs, with_proj=spec.w("feat_proj") > 0
    )


def feature_maps_for(spec_layers, student_cfg, teacher_cfg, rngs, with_proj: bool) -> dict:
    """One learned linear map per aligned hidden layer (+ one for projected image tokens) when widths differ."""
    ds, dt = student_cfg.text.hidden_size, teacher_cfg.text.hidden_size
    maps = {}
    for i, _ in enumerate(spec_layers):
        maps[f"layer{i}"] = L.FeatureProjector(ds, dt, rngs=rngs)
    if with_proj:
        maps["proj"] = L.FeatureProjector(ds, dt, rngs=rngs)
    return maps


# ----------------------------------------------------------------------------------------------- the step
def make_train_step(
    student: DistillStudent,
    teacher,
    spec: StepSpec,
    tx: optax.GradientTransformation,
    trainable: str = "all",
    *,
    mesh=None,
    donate: bool = True,
    donate_params: bool = False,
):
    """Builds `(init, step, parts)` for a `DistillStudent` (+ an optional frozen teacher).

    init: (params, rng_key) -> TrainState, where params = parts["params"] (the trainable subset).
    step: (state, frozen_student_state, teacher_state, batch) -> (state, metrics), jit-compiled. With a `mesh`, every
      input and output has an explicit sharding from the logical-axis rules (rskd_jax.parallel.rules): parameters and
      optimizer moments per the weight annotations, the batch over (data, fsdp); the state is donated.
    parts: graphdef / params / frozen (student) and teacher_graphdef / teacher (states), for checkpointing and export.
    """
    filt = trainable_filter(trainable)
    graphdef, params, frozen = nnx.split(student, filt, ...)
    t_graphdef, t_state = nnx.split(teacher) if teacher is not None else (None, None)
    if len(jax.tree.leaves(params)) == 0:
        raise ValueError(f"trainable={trainable!r} selects no parameter of the student")
    if teacher is not None:  # a feature term that would only train its discarded map is refused
        paths = [path_str(p) for p, _ in nnx.to_flat_state(params)]
        check_feature_terms(spec.weights, paths, trainable, spec.shared_vision)

    def init_fn(p, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=rng)

    def loss_fn(p, fz, ts, mb, rng):
        st = nnx.merge(graphdef, p, fz)
        te = nnx.merge(t_graphdef, ts) if t_graphdef is not None else None
        return compute_loss(st, te, mb, rng, spec)

    parts = dict(
        graphdef=graphdef, params=params, frozen=frozen, teacher_graphdef=t_graphdef, teacher=t_state
    )
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
        metrics = dict(metrics, grad_norm=gnorm, skipped=(~finite).astype(jnp.float32))
        return new_state, metrics

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
        DistillStudent(student, maps),
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
        DistillStudent(model),
        None,
        sft_spec(config, model.cfg),
        make_optimizer(config.optim),
        trainable or config.trainable,
        mesh=mesh,
        donate=donate,
    )


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
