"""How far a student is from its teacher, measured the way the distillation optimises it.

`divergence_to_teacher(student, teacher, batches, max_new_tokens=..., seed=...)` reports, token-weighted over
all batches (masked token means, `rskd_jax.distill.losses` conventions; natural log, nats):

* `rkl_sampled`: the exact token-level reverse KL  KL(q || p)_t = sum_v q(v | y_<t) log(q / p) at every
  position of responses SAMPLED FROM THE STUDENT (alpha = 0, temperature 1, no top-k/top-p:
  `rollout.sample`), both distributions from a teacher-forced forward of each model over prompt + response.
  Its expectation over the student's own sequences is MiniLLM's sequence-level objective KL(q || p), per
  token.
* `fkl_gt`, `rkl_gt`: forward KL(p || q) and reverse KL(q || p) on the ground-truth answer tokens
  (teacher-forced on `input_ids`, positions where `loss_mask` marks the next token as a target).

Full-vocabulary distributions are compared (the rollout never samples the image placeholder id; for models
whose placeholder lies inside the vocabulary this makes the sampled positions a slightly different state
distribution, not a different KL formula). One jitted function per batch shape does sampling + both
forwards; rows with `example_id < 0` (padding of the last eval batch) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.distill import losses
from rskd_jax.distill.rollout import SamplingConfig, sample


def _sampled_terms(student, teacher, prompt_ids, prompt_mask, pixel_values, rng, cfg, eos_id, pad_id):
    """Sample from the student; per-token reverse KL at the response positions -> (rkl [B,R], rollout)."""
    r = sample(
        student,
        None,
        prompt_ids,
        prompt_mask,
        rng,
        cfg,
        eos_id=eos_id,
        pad_id=pad_id,
        pixel_values=pixel_values,
    )
    plen = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, r.tokens], 1)
    mask = jnp.concatenate([prompt_mask, r.mask.astype(prompt_mask.dtype)], 1)
    at = jnp.broadcast_to(plen - 1 + jnp.arange(cfg.max_new_tokens), r.tokens.shape)  # logits predicting y_t
    s_logits = student(ids, pixel_values, mask, logits_at=at).logits
    t_logits = teacher(ids, pixel_values, mask, logits_at=at).logits
    return losses.reverse_kl_per_token(s_logits, t_logits), r


def _gt_terms(student, teacher, input_ids, attention_mask, loss_mask, pixel_values, answer_len):
    """Forward / reverse KL per target position of the ground-truth answers -> (fkl, rkl, mask) [B, K]."""
    target = loss_mask[:, 1:] != 0  # position t predicts token t + 1
    k = target.shape[1] if answer_len is None else min(answer_len, target.shape[1])
    # The first k target positions of each row, in order (stable sort puts targets first).
    pos = jnp.argsort(~target, axis=1, stable=True)[:, :k].astype(jnp.int32)
    valid = jnp.take_along_axis(target, pos, axis=1)
    s_logits = student(input_ids, pixel_values, attention_mask, logits_at=pos).logits
    t_logits = teacher(input_ids, pixel_values, attention_mask, logits_at=pos).logits
    fkl = losses.forward_kl_per_token(s_logits, t_logits)
    rkl = losses.reverse_kl_per_token(s_logits, t_logits)
    return fkl, rkl, valid, target.sum(1)


def divergence_to_teacher(
    student,
    teacher,
    batches: Iterable,
    *,
    max_new_tokens: int,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    answer_len: int | None = None,
    return_samples: bool = False,
) -> dict:
    """Token-weighted divergences of `student` from `teacher` over `batches` (see the module doc).

    batches: dicts of the batch contract (or `(batch, records)` pairs from `data.eval_batches`); they need
    `prompt_ids`/`prompt_mask` (left-padded) for the sampled term and `input_ids`/`attention_mask`/`loss_mask`
    for the ground-truth terms (skipped when absent). eos_id / pad_id default to the student's config.
    answer_len: at most this many ground-truth target tokens per row (None = all; the rest are counted in
    `gt_tokens_dropped`). return_samples: also return the sampled `(tokens, mask)` of each batch.
    """
    cfg_s = student.cfg
    eos = int(cfg_s.eos_token_id if eos_id is None else eos_id)
    pad = int(cfg_s.pad_token_id if pad_id is None else pad_id)
    scfg = SamplingConfig(max_new_tokens=int(max_new_tokens), alpha=0.0, temperature=1.0, top_k=0, top_p=1.0)
    sampled, ground_truth = _batch_fns(scfg, eos, pad, answer_len)
    acc = dict(rkl=0.0, n=0.0, ended=0.0, rows=0.0, fkl_gt=0.0, rkl_gt=0.0, n_gt=0.0, targets=0.0)
    samples = []
    key = jax.random.key(seed)
    for b, item in enumerate(batches):
        batch = item[0] if isinstance(item, tuple) else item  # data.eval_batches yields (batch, records)
        rows = np.asarray(batch["prompt_ids"]).shape[0]
        w = np.asarray(batch["example_id"]) >= 0 if "example_id" in batch else np.ones(rows, bool)
        w = w.astype(np.float32)
        px = batch.get("pixel_values")
        px = None if px is None else jnp.asarray(px, jnp.float32)
        out = sampled(
            student,
            teacher,
            jnp.asarray(batch["prompt_ids"], jnp.int32),
            jnp.asarray(batch["prompt_mask"], jnp.int32),
            px,
            jax.random.fold_in(key, b),
            jnp.asarray(w),
        )
        for k, v in zip(("rkl", "n", "ended"), out[:3]):
            acc[k] += float(v)
        acc["rows"] += float(w.sum())
        if return_samples:
            samples.append((np.asarray(out[3]), np.asarray(out[4])))
        if "input_ids" in batch and "loss_mask" in batch:
            g = ground_truth(
                student,
                teacher,
                jnp.asarray(batch["input_ids"], jnp.int32),
                jnp.asarray(batch["attention_mask"], jnp.int32),
                jnp.asarray(batch["loss_mask"], jnp.int32),
                px,
                jnp.asarray(w),
            )
            for k, v in zip(("fkl_gt", "rkl_gt", "n_gt", "targets"), g):
                acc[k] += float(v)
    res = _summary(acc, max_new_tokens)
    if return_samples:
        res["samples"] = samples
    return res


def _batch_fns(scfg: SamplingConfig, eos: int, pad: int, answer_len: int | None):
    """The two jitted per-batch sums: (sampled term, ground-truth terms), rows weighted by `w` [B]."""

    @nnx.jit
    def sampled(s, t, ids, mask, px, rng, w):
        rkl, r = _sampled_terms(s, t, ids, mask, px, rng, scfg, eos, pad)
        m = r.mask * w[:, None]
        ended = jnp.any((r.tokens == eos) & (r.mask > 0), axis=1)
        return (jnp.sum(jnp.where(m > 0, rkl, 0.0)), m.sum(), jnp.sum(ended * w), r.tokens, r.mask)

    @nnx.jit
    def ground_truth(s, t, ids, am, lm, px, w):
        fkl, rkl, valid, n_target = _gt_terms(s, t, ids, am, lm, px, answer_len)
        m = valid * w[:, None]
        return (
            jnp.sum(jnp.where(m > 0, fkl, 0.0)),
            jnp.sum(jnp.where(m > 0, rkl, 0.0)),
            m.sum(),
            jnp.sum(n_target * w),
        )

    return sampled, ground_truth


def _summary(acc: dict, max_new_tokens: int) -> dict:
    """Token-weighted means of the accumulated sums (the ground-truth terms only when there were targets)."""
    if not acc["rows"]:
        raise ValueError("divergence_to_teacher: no batches (or only padding rows)")
    res = dict(
        rkl_sampled=acc["rkl"] / max(acc["n"], 1.0),
        n_sampled_tokens=int(acc["n"]),
        mean_response_length=acc["n"] / acc["rows"],
        eos_rate=acc["ended"] / acc["rows"],
        n_examples=int(acc["rows"]),
        max_new_tokens=int(max_new_tokens),
    )
    if acc["targets"]:
        res.update(
            fkl_gt=acc["fkl_gt"] / max(acc["n_gt"], 1.0),
            rkl_gt=acc["rkl_gt"] / max(acc["n_gt"], 1.0),
            n_gt_tokens=int(acc["n_gt"]),
            gt_tokens_dropped=int(acc["targets"] - acc["n_gt"]),
        )
    return res
