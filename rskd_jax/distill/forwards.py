"""The forward passes of one train step: the rollout, the response views and the ground-truth views.

Every function here runs models; none computes a loss (terms.py). Which of them run is `parts.StepParts`.
Teacher outputs leave these functions under `stop_gradient` (the teacher is frozen).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rskd_jax.distill import prefix as PX
from rskd_jax.distill import rollout as R
from rskd_jax.distill.parts import StepParts
from rskd_jax.distill.spec import StepSpec


class Views(NamedTuple):
    """Hidden states the terms read. s_resp / t_resp: [B, R, D] the states predicting each response token
    (None without a rollout); s_gt / t_gt: the `LlavaOutput` of the ground-truth view (None when not run)."""

    s_resp: jax.Array | None
    t_resp: jax.Array | None
    s_gt: object
    t_gt: object


def frozen_model(model):
    """The same module with every array wrapped in stop_gradient (the rollout never back-propagates)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def vision_features(teacher, batch, parts: StepParts):
    """(student, teacher) precomputed vision features: the teacher's tower output for both with shared
    vision (frozen), else (None, None) and every forward runs its own tower."""
    if parts.shared_vision and "pixel_values" in batch:
        tv = jax.lax.stop_gradient(teacher.vision_features(batch["pixel_values"]))
        return tv, tv
    return None, None


def rollout(model, teacher, batch, rng, spec: StepSpec, parts: StepParts, sv, tv) -> R.Rollout:
    """Teacher-mixed sampling from the current student (no gradient): rollout.sample over the batch's prompts.
    With prefix reuse the teacher's states (KV cache, prompt hidden states at the aligned teacher layers,
    response states) are kept in `Rollout.teacher_states`."""
    ro = R.sample(
        frozen_model(model),
        frozen_model(teacher) if teacher is not None else None,
        batch["prompt_ids"],
        batch["prompt_mask"],
        rng,
        spec.sampling,
        eos_id=spec.eos_id,
        pad_id=spec.pad_id,
        pixel_values=batch.get("pixel_values"),
        student_vision_features=sv,
        teacher_vision_features=tv,
        keep_teacher=parts.teacher_layers if parts.reuse_prefix else None,
    )
    return jax.tree.map(jax.lax.stop_gradient, ro)


def response_view(prompt_ids, prompt_mask, ro: R.Rollout):
    """prompt (left-padded) + response -> ids, mask and the R positions whose logits predict the response."""
    ids = jnp.concatenate([prompt_ids, ro.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), ro.mask.astype(jnp.int32)], axis=1)
    plen, rlen = prompt_ids.shape[1], ro.tokens.shape[1]
    return ids, mask, plen - 1 + jnp.arange(rlen)


def response_hidden(m, batch, ro: R.Rollout, vision, dropout_rng=None):
    """[B, R, D]: `m`'s last hidden states predicting the response tokens, from a forward over prompt + response."""
    ids, mask, pos = response_view(batch["prompt_ids"], batch["prompt_mask"], ro)
    out = m(
        ids,
        batch.get("pixel_values"),
        attention_mask=mask,
        vision_features=vision,
        compute_logits=False,
        dropout_rng=dropout_rng,
    )
    return jnp.take(out.last_hidden, pos, axis=1)


def packed_view(batch, ro: R.Rollout):
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


def _packed_forward(m, batch, ro, vision, layers, dropout_rng=None):
    """`m` over the packed [GT | response] sequence -> (response states [B, R, D], GT-view LlavaOutput, bad)."""
    ids, positions, amask, pos, bad = packed_view(batch, ro)
    t_len = batch["input_ids"].shape[1]
    kw = dict(positions=positions, attn_mask=amask, compute_logits=False)
    out = m(
        ids,
        batch.get("pixel_values"),
        vision_features=vision,
        return_hidden=layers,
        dropout_rng=dropout_rng,
        **kw,
    )
    gt = out.replace(
        last_hidden=out.last_hidden[:, :t_len],
        hidden_states={i: x[:, :t_len] for i, x in out.hidden_states.items()},
    )
    return jnp.take_along_axis(out.last_hidden, pos[..., None], axis=1), gt, bad


def gt_forward(m, batch, vision, layers, dropout_rng=None):
    """`m` over the ground-truth conversation `input_ids` -> LlavaOutput (hidden states at `layers`)."""
    return m(
        batch["input_ids"],
        batch.get("pixel_values"),
        attention_mask=batch["attention_mask"],
        vision_features=vision,
        compute_logits=False,
        return_hidden=layers,
        dropout_rng=dropout_rng,
    )


def teacher_gt_from_rollout(teacher, batch, ro: R.Rollout, layers, tv, spec: StepSpec):
    """The teacher's ground-truth view from the rollout's prompt states (rskd_jax.distill.prefix), falling
    back to a full forward over `input_ids` -> (LlavaOutput, fell back 0/1)."""
    full_forward = lambda: gt_forward(teacher, batch, tv, layers)
    view, fell_back = PX.teacher_gt_view(
        teacher, batch, ro.teacher_states, layers, full_forward, spec.image_token_id
    )
    return jax.lax.stop_gradient(view), fell_back


def response_views(model, teacher, batch, ro: R.Rollout, spec: StepSpec, parts: StepParts, sv, tv, drop):
    """The views after a rollout -> (Views, metrics). The student's response states (its own forward over
    prompt + response, or the packed forward that gives its ground-truth view too), the teacher's from
    `parts.teacher_response`, and the teacher's ground-truth view when the rollout's prefix or the packed
    forward provides it. `drop`: the student's dropout key."""
    metrics, s_gt, t_gt = {}, None, None
    if parts.teacher_gt == "prefix":
        t_gt, metrics["teacher/prefix_fallback"] = teacher_gt_from_rollout(
            teacher, batch, ro, parts.teacher_layers, tv, spec
        )
    if parts.packed:
        s_resp, s_gt, metrics["data/prompt_not_prefix"] = _packed_forward(
            model, batch, ro, sv, parts.student_layers, drop
        )
    else:
        s_resp = response_hidden(model, batch, ro, sv, drop)
    if parts.teacher_response == "rollout":
        t_resp = ro.teacher_states.response
    elif parts.teacher_response == "packed":
        t_resp, t_gt, _ = jax.lax.stop_gradient(_packed_forward(teacher, batch, ro, tv, parts.teacher_layers))
    else:
        t_resp = jax.lax.stop_gradient(response_hidden(teacher, batch, ro, tv))
    return Views(s_resp, t_resp, s_gt, t_gt), metrics


def gt_views(model, teacher, batch, views: Views, parts: StepParts, sv, tv, drop) -> Views:
    """`views` with the ground-truth views filled in: the student's own forward over `input_ids` unless the
    packed forward gave it, the teacher's when `parts.teacher_gt` says "forward"."""
    if views.s_gt is not None:
        return views
    t_gt = views.t_gt
    s_gt = gt_forward(model, batch, sv, parts.student_layers, drop)
    if parts.teacher_gt == "forward":
        t_gt = jax.lax.stop_gradient(gt_forward(teacher, batch, tv, parts.teacher_layers))
    return views._replace(s_gt=s_gt, t_gt=t_gt)
