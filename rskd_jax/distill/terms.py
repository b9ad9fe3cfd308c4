"""The loss terms of one train step, on the views `forwards.py` computed (no model forward here beyond the
vocabulary heads, which run in chunks inside `losses.chunked_token_loss`).

Each function returns `losses`, a list of `(metric name, weight, value)` in the order they add to the
total (the order is part of the step's bit-for-bit behaviour), and `rollout_terms` also diagnostics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rskd_jax.distill import losses as L
from rskd_jax.distill import rollout as R
from rskd_jax.distill.parts import StepParts
from rskd_jax.distill.spec import StepSpec


def answer_positions(loss_mask):
    """For a right-padded GT batch: logits at t-1 predict token t, so the predicting positions are shifted by one."""
    return jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)


def _advantages(ro: R.Rollout, spec: StepSpec):
    """Long-term advantages of the sampled tokens (rewards: teacher minus student log-probs), no gradient."""
    rewards = (ro.teacher_logprobs - ro.student_logprobs) * ro.mask
    return jax.lax.stop_gradient(
        L.long_term_advantages(
            rewards,
            ro.mask,
            gamma=spec.gamma,
            include_current=spec.include_current,
            length_norm=spec.length_norm,
            whiten=spec.whiten,
        )
    )


def _rollout_diagnostics(ro: R.Rollout) -> dict:
    rmask = ro.mask
    n = jnp.maximum(rmask.sum(), 1.0)
    return {
        "rollout/rev_kl_k3": L.k3_reverse_kl_estimate(ro.teacher_logprobs, ro.student_logprobs, rmask),
        "rollout/length": ro.lengths.astype(jnp.float32).mean(),
        "rollout/iw_mean": (ro.weights * rmask).sum() / n,
        "rollout/iw_max": jnp.max(jnp.where(rmask > 0, ro.weights, -jnp.inf)),
        "rollout/iw_min": jnp.min(jnp.where(rmask > 0, ro.weights, jnp.inf)),
    }


def rollout_terms(model, teacher, ro: R.Rollout, s_resp, t_resp, spec: StepSpec, parts: StepParts):
    """The terms on the sampled responses.

    in:  `ro` the rollout (tokens, mask, both models' log-probs at sampling time, importance weights);
         `s_resp` / `t_resp` [B, R, D] the student's / teacher's last hidden states predicting each response
         token; `model.logits` / `teacher.logits` their vocabulary heads.
    out: (losses, metrics). losses: "loss/rkl" the single-step divergence `spec.divergence` (MiniLLM
         `_reg_loss`) and "loss/pg" the clipped policy gradient with length-normalised long-term advantages
         (MiniLLM `_pg_loss`), each when weighted (`parts.rollout_terms`); metrics: rollout diagnostics
         (k3 reverse-KL estimate, response length, importance-weight mean / max / min).
    """
    adv = _advantages(ro, spec)
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
        ro.mask,
        per_token,
        spec.chunk_size,
        token_args=(ro.tokens, ro.student_logprobs, adv, ro.weights),
    )
    losses = [(f"loss/{k}", spec.w(k), terms[k]) for k in parts.rollout_terms]
    return losses, _rollout_diagnostics(ro)


def gt_terms(model, teacher, batch, s_gt, t_gt, spec: StepSpec, parts: StepParts) -> list:
    """The vocabulary-sized terms on the ground-truth answer tokens.

    in:  `batch` input_ids / loss_mask (the answer tokens); `s_gt` / `t_gt` the student's / teacher's
         ground-truth-view outputs (`last_hidden` [B, T, D]; `t_gt` None without a teacher view).
    out: losses "loss/sft" (cross-entropy of the answer tokens) and "loss/fkl" (forward KL to the teacher
         on them, MiniLLM L_PT's KD part), those in `parts.token_terms`, at temperature `spec.temperature`.
    """
    if not parts.token_terms:
        return []
    ids = batch["input_ids"]
    pred_mask = answer_positions(
        batch["loss_mask"].astype(jnp.float32)
    )  # positions predicting an answer token
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    tau = spec.temperature
    use_fkl = "fkl" in parts.token_terms

    def per_token(s_lg, t_lg, tgt):
        out = dict(sft=-L.token_logprobs(s_lg / tau, tgt))
        if use_fkl:
            out["fkl"] = L.forward_kl_per_token(s_lg / tau, t_lg / tau)
        return out

    terms, _ = L.chunked_token_loss(
        s_gt.last_hidden,
        t_gt.last_hidden if use_fkl else None,
        model.logits,
        teacher.logits if use_fkl else None,
        pred_mask,
        per_token,
        spec.chunk_size,
        token_args=(targets,),
    )
    return [(f"loss/{k}", spec.w(k), terms[k]) for k in parts.token_terms]


def feature_terms(maps, batch, s_gt, t_gt, spec: StepSpec, parts: StepParts) -> list:
    """Feature alignment on the ground-truth view, through the learned student->teacher width `maps`.

    in:  `s_gt` / `t_gt` ground-truth-view outputs with `hidden_states` at the aligned layers and
         `image_features` (projected image tokens); `batch` input_ids / attention_mask / loss_mask (which
         positions are image tokens, which are answer tokens).
    out: losses "loss/feat_image/{i}" and "loss/feat_text/{i}" per aligned layer i (image tokens and answer
         tokens averaged separately, `losses.cross_modal_alignment`) and "loss/feat_proj" on the projected
         image tokens, each when weighted.
    """
    if t_gt is None:
        return []
    ids, amask = batch["input_ids"], batch["attention_mask"]
    lmask = batch["loss_mask"].astype(jnp.float32)
    image_mask = (ids == spec.image_token_id).astype(jnp.float32) * amask
    losses = []
    for i, (si, ti) in enumerate(parts.feature_layers):
        proj = maps[f"layer{i}"] if f"layer{i}" in maps else None
        groups = L.cross_modal_alignment(
            s_gt.hidden_states[si],
            t_gt.hidden_states[ti],
            image_mask,
            lmask,
            kind=spec.feature_kind,
            proj=proj,
        )
        for key, wname in (("image", "feat_image"), ("text", "feat_text")):
            if spec.w(wname) > 0:
                losses.append((f"loss/{wname}/{i}", spec.w(wname), groups[key]))
    if parts.feat_proj and s_gt.image_features is not None:
        proj = maps["proj"] if "proj" in maps else None
        valid = jnp.ones(s_gt.image_features.shape[:2], jnp.float32)
        fp = L.feature_alignment_loss(
            s_gt.image_features, t_gt.image_features, valid, kind=spec.feature_kind, proj=proj
        )
        losses.append(("loss/feat_proj", spec.w("feat_proj"), fp))
    return losses
