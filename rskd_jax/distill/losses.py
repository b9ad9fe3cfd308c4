"""Distillation losses: token-level divergences, MiniLLM's policy-gradient pieces, feature alignment.

Everything here is a pure array function (plus one tiny nnx module, `FeatureProjector`), so it is testable
without a model and composable inside one jitted step. Notation follows ../shared/reference/minillm.md:
p = teacher, q = student, both softmax(logits / temperature) over the full shared vocabulary.

Conventions shared by every function:
* Math runs in float32 (float64 stays float64, so finite-difference tests can run under `jax.enable_x64`).
* `mask` is [B, T]; nonzero = valid token. Losses reduce to masked token means sum(x·m) / max(sum(m), 1):
  an all-padding batch gives 0, not NaN. Padded positions are removed with `where`, so a non-finite value
  there cannot leak into the mean.
* The teacher is a constant: teacher logits/features go through `stop_gradient`.
* No temperature² factor (MiniLLM uses none; multiply outside for Hinton-style KD).
* -inf logits (top-k / top-p filtered entries) never produce NaN, in the value or the gradient:
  - 0·log 0 = 0: a vocabulary entry whose weighting probability is 0 contributes nothing;
  - the forward / reverse KL additionally drop entries where EITHER model's logit is -inf, exactly like
    MiniLLM's `get_x_entropy` / `get_entropy` (log-probs zeroed at `inf_mask`). With the same filter on both
    models (what the rollout produces) this is the exact KL between the two truncated distributions; with
    a filter on one side only it is the KL over the common support (finite) rather than +inf.
  - the skew / JSD mixtures are positive wherever either distribution is, so they need no extra rule.
  Each row must keep at least one finite logit.

Vocabulary-sized terms can be evaluated in sequence chunks with rematerialisation (`chunked_token_loss`)
so fp32 [B, T, V] logits of both models never exist at once; every divergence therefore has a
`*_per_token(...) -> [B, T]` form that the chunked loop (or `masked_mean`) reduces. (The scalar forms the
tests compare with MiniLLM's and TRL's losses are in tests/test_distill_testlib.py.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
NEG_INF = -jnp.inf


# ------------------------------------------------------------------------------------------------------------
# Reductions and small helpers.


def _float(x: Array) -> Array:
    """Upcast to at least float32 (float64 inputs stay float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_sum_and_count(x: Array, mask: Array) -> tuple[Array, Array]:
    """(sum of x over valid positions, number of valid positions); metrics-friendly, psum-able."""
    x = _float(x)
    valid = jnp.broadcast_to(jnp.asarray(mask) != 0, x.shape)
    return jnp.sum(jnp.where(valid, x, 0.0)), jnp.sum(valid).astype(x.dtype)


def masked_mean(x: Array, mask: Array) -> Array:
    """Token mean of x over valid positions: sum(x·m) / max(sum(m), 1)."""
    total, count = masked_sum_and_count(x, mask)
    return total / jnp.maximum(count, 1.0)


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
    """float32 log-softmax(logits / temperature) over the last axis."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return jax.nn.log_softmax(_float(logits) / temperature, axis=-1)


def token_logprobs(logits: Array, ids: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / temperature)[..., ids]: [B, T, V], [B, T] -> [B, T].

    Computed as gathered logit minus logsumexp, so the [B, T, V] log-softmax is not materialised. A -inf
    (filtered) logit at `ids` gives -inf, as in MiniLLM's `get_log_probs`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _float(logits) / temperature
    picked = jnp.take_along_axis(z, jnp.asarray(ids)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def _kl_sum(log_a: Array, log_b: Array, valid: Array) -> Array:
    """sum_v a (log a - log b) over `valid` entries only, with NaN-free gradients (double `where`)."""
    la = jnp.where(valid, log_a, 0.0)
    lb = jnp.where(valid, log_b, 0.0)
    return jnp.sum(jnp.where(valid, jnp.exp(la) * (la - lb), 0.0), axis=-1)


def _teacher_student_logprobs(student_logits, teacher_logits, temperature):
    lq = log_probs(student_logits, temperature)
    lp = log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
    return lp, lq


def _log_mix(lp: Array, lq: Array, w_p: float) -> Array:
    """log(w_p·p + (1 - w_p)·q) in log space; entries where both are -inf get 0 (summed with weight 0)."""
    dead = (lp == NEG_INF) & (lq == NEG_INF)
    lp, lq = jnp.where(dead, 0.0, lp), jnp.where(dead, 0.0, lq)
    log_wp = math.log(w_p) if w_p > 0 else -math.inf
    log_wq = math.log1p(-w_p) if w_p < 1 else -math.inf
    return jnp.logaddexp(lp + log_wp, lq + log_wq)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


# ------------------------------------------------------------------------------------------------------------
# Token-level divergences: per-token [B, T] forms and masked means.


def forward_kl_per_token(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
    """KL(p || q)_t = sum_v p (log p - log q)  (word-level KD; same gradient as the soft cross-entropy)."""
    lp, lq = _teacher_student_logprobs(student_logits, teacher_logits, temperature)
    return _kl_sum(lp, lq, (lp != NEG_INF) & (lq != NEG_INF))


def reverse_kl_per_token(student_logits: Array, teacher_logits: Array, temperature: float = 1.0) -> Array:
    """KL(q || p)_t = sum_v q (log q - log p): MiniLLM's single-step term (`_reg_loss` = x-entropy - entropy).

    The gradient flows through q in both the weights and the log q term; the teacher is a constant.
    """
    lp, lq = _teacher_student_logprobs(student_logits, teacher_logits, temperature)
    return _kl_sum(lq, lp, (lp != NEG_INF) & (lq != NEG_INF))


def skew_forward_kl_per_token(student_logits, teacher_logits, alpha: float = 0.1, temperature: float = 1.0):
    """DistiLLM skew KL: SKL_a(p, q) = KL(p || a p + (1 - a) q).

    DistiLLM's code returns the cross-entropy form -sum p log(a p + (1-a) q), which differs by the constant
    H(p) (same gradient); this returns the KL itself (>= 0, = 0 iff p = q).
    """
    alpha = _check_unit("alpha", alpha)
    lp, lq = _teacher_student_logprobs(student_logits, teacher_logits, temperature)
    return _kl_sum(lp, _log_mix(lp, lq, alpha), lp != NEG_INF)


def skew_reverse_kl_per_token(student_logits, teacher_logits, alpha: float = 0.1, temperature: float = 1.0):
    """DistiLLM skew reverse KL: SRKL_a(p, q) = KL(q || (1 - a) p + a q)."""
    alpha = _check_unit("alpha", alpha)
    lp, lq = _teacher_student_logprobs(student_logits, teacher_logits, temperature)
    return _kl_sum(lq, _log_mix(lp, lq, 1.0 - alpha), lq != NEG_INF)


def generalized_jsd_per_token(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """GKD generalised JSD, TRL convention (trl GKDTrainer.generalized_jsd_loss).

    M = beta·p + (1 - beta)·q;  JSD(beta) = beta·KL(p || M) + (1 - beta)·KL(q || M) for 0 < beta < 1, and the
    endpoints are special-cased: beta = 0 -> forward KL(p || q), beta = 1 -> reverse KL(q || p). (The interior
    formula tends to 0 at both ends, so the special cases make the function discontinuous there, as in TRL.)
    EasyDeL (trainers/generalized_knowledge_distillation_trainer/_fn.py) uses the OPPOSITE endpoint
    convention: its b = 0 is reverse KL and b = 1 forward KL, with M = (1 - b) p + b q and
    b·KL(p || M) + (1 - b)·KL(q || M) in between (continuous at both ends). The two agree only at 0.5, so a
    `beta` must not be copied between the two libraries' configs. `beta` is a Python float.
    """
    beta = _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl_per_token(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl_per_token(student_logits, teacher_logits, temperature)
    lp, lq = _teacher_student_logprobs(student_logits, teacher_logits, temperature)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl_sum(lp, lm, lp != NEG_INF) + (1.0 - beta) * _kl_sum(lq, lm, lq != NEG_INF)


TOKEN_DIVERGENCES = ("rkl", "fkl", "skew_fkl", "skew_rkl", "jsd")


def token_divergence(name: str, *, skew_alpha: float = 0.1, jsd_beta: float = 0.5) -> Callable:
    """The per-token divergence `(student_logits, teacher_logits) -> [B, T]` a config names (`loss.divergence`):
    rkl (MiniLLM's single-step reverse KL), fkl, skew_fkl / skew_rkl (DistiLLM, mixing weight `skew_alpha`),
    jsd (GKD's generalised JSD, TRL's `beta` convention)."""
    table = {
        "rkl": reverse_kl_per_token,
        "fkl": forward_kl_per_token,
        "skew_fkl": lambda s, t: skew_forward_kl_per_token(s, t, skew_alpha),
        "skew_rkl": lambda s, t: skew_reverse_kl_per_token(s, t, skew_alpha),
        "jsd": lambda s, t: generalized_jsd_per_token(s, t, jsd_beta),
    }
    if name not in table:
        raise ValueError(f"config loss.divergence={name!r}: expected one of {', '.join(TOKEN_DIVERGENCES)}")
    return table[name]


# ------------------------------------------------------------------------------------------------------------
# MiniLLM long-term (policy-gradient) term.


def long_term_advantages(
    rewards: Array,
    mask: Array,
    gamma: float = 1.0,
    include_current: bool = False,
    length_norm: bool = True,
    whiten: bool = False,
) -> Array:
    """Advantages for the long-term policy-gradient term, [B, T] -> [B, T] (detached, 0 at padded positions).

    Return G_t = sum_{t' >= t} gamma^(t'-t) r_t'  (rewards at padded positions are zeroed first).
    * include_current=False (paper Eq. 3): A_t = G_{t+1} = sum_{t' > t} gamma^(t'-t-1) r_t'. The current
      token's quality is already counted exactly by the single-step (full-vocabulary reverse-KL) term.
    * include_current=True (MiniLLM code): A_t = G_t.
    * length_norm: divide by n_t = number of valid tokens in the summed range ((t, end] resp. [t, end]); an
      empty range gives A = 0. This is the paper's R^Norm ("1/(T - t - 1)" is that count in its indexing).
    * whiten: (A - mean) / sqrt(var + 1e-8) with mean / population variance over VALID tokens only.

    Where MiniLLM's code (minillm/minillm/losses.py::_get_advantages_and_returns) differs: it always uses
    G_t (current step included), gamma = 0.95 (argparse default), n_t counted including t, always length
    normalises, and whitens over the whole [B, R] tensor INCLUDING padded positions (torch.var_mean, unbiased,
    on one process; biased global stats across ranks). `include_current=True, gamma=0.95, whiten=False`
    reproduces its advantages exactly at valid positions without whitening.

    Defaults are the paper's objective (gamma = 1, R_{t+1}, length normalised, not whitened): gamma < 1 and
    the current-step reward bias the estimator away from the sequence-level reverse KL that the
    decomposition is exact for, and whitening that mixes in pads shifts advantages by the padding fraction
    (which varies with response length). Whitening over valid tokens is available for variance reduction.
    """
    r = _float(rewards)
    valid = jnp.asarray(mask) != 0
    m = valid.astype(r.dtype)
    r = jnp.where(valid, r, 0.0)

    def suffix_sums(x, discount):  # reverse scan over time: s_t = x_t + discount * s_{t+1}
        def step(carry, xt):
            carry = xt + discount * carry
            return carry, carry

        _, out = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), x.T, reverse=True)
        return out.T

    g = suffix_sums(r, gamma)
    n = suffix_sums(m, 1.0)
    if not include_current:  # shift: value at t is the suffix starting at t + 1
        g = jnp.concatenate([g[:, 1:], jnp.zeros_like(g[:, :1])], axis=1)
        n = jnp.concatenate([n[:, 1:], jnp.zeros_like(n[:, :1])], axis=1)
    adv = g / jnp.maximum(n, 1.0) if length_norm else g
    if whiten:
        mean = masked_mean(adv, valid)
        var = masked_mean(jnp.square(adv - mean), valid)
        adv = (adv - mean) * jax.lax.rsqrt(var + 1e-8)
    return jax.lax.stop_gradient(jnp.where(valid, adv, 0.0))


def policy_gradient_per_token(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    weights: Array | None = None,
    clip_eps: float = 0.2,
) -> Array:
    """PPO-clipped per-token loss max(-A·ratio, -A·clip(ratio, 1 ± eps)), ratio = exp(log q - log q_old)·w.

    As MiniLLM's `_pg_loss`: the importance weight w multiplies the ratio BEFORE clipping. Only `logprobs`
    carries gradient (old log-probs, advantages and weights are detached).
    """
    old = jax.lax.stop_gradient(_float(old_logprobs))
    adv = jax.lax.stop_gradient(_float(advantages))
    ratio = jnp.exp(_float(logprobs) - old)
    if weights is not None:
        ratio = ratio * jax.lax.stop_gradient(_float(weights))
    return jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))


def k3_reverse_kl_estimate(
    logp_teacher: Array, logq_student: Array, mask: Array, per_sequence: bool = True
) -> Array:
    """MiniLLM's logged reverse-KL estimate on sampled tokens: k3 = exp(d) - 1 - d >= 0, d = log p - log q.

    per_sequence=True matches MiniLLM's logged `rev_kl` with length_norm: per-sequence sum / length, then the
    mean over sequences (rows with no valid token count as 0). per_sequence=False gives the token mean.
    Detached (metrics only).
    """
    valid = jnp.asarray(mask) != 0
    d = jax.lax.stop_gradient(jnp.where(valid, _float(logp_teacher) - _float(logq_student), 0.0))
    k3 = jnp.expm1(d) - d
    if not per_sequence:
        return masked_mean(k3, valid)
    per_row = jnp.sum(jnp.where(valid, k3, 0.0), axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1)
    return jnp.mean(per_row)


# ------------------------------------------------------------------------------------------------------------
# Chunked evaluation of vocabulary-sized terms.


def chunked_token_loss(
    student_hidden: Array,
    teacher_hidden: Array | None,
    student_head: Callable[[Array], Array],
    teacher_head: Callable[[Array], Array] | None,
    mask: Array,
    loss_fn: Callable[..., Any],
    chunk_size: int = 128,
    token_args: tuple[Array, ...] = (),
) -> tuple[Any, dict]:
    """Masked token mean of a per-token loss, computed over sequence chunks with rematerialisation.

    Args:
      student_hidden, teacher_hidden: [B, T, D_s], [B, T, D_t] final hidden states (teacher may be None).
      student_head, teacher_head: callables hidden -> logits, e.g. closures over lm_head weights.
      mask: [B, T]; nonzero = valid.
      loss_fn: `loss_fn(student_logits [B, C, V], teacher_logits [B, C, V] | None, *token_args_chunk)` ->
        a [B, C] array or a pytree of [B, C] arrays (several terms in one pass), e.g.
        `lambda s, t, ids, old, adv, w: dict(rkl=reverse_kl_per_token(s, t),
             pg=policy_gradient_per_token(token_logprobs(s, ids), old, adv, w))`.
      chunk_size: tokens per chunk; T is zero-padded up to a multiple (padding is masked out).
      token_args: extra [B, T, ...] arrays chunked like the hidden states (ids, advantages, ...).

    Returns:
      (value, aux): value has loss_fn's structure, each leaf = sum over valid tokens / max(count, 1) (the same
      as the unchunked masked mean); aux = {"sum": same-structure sums, "count": number of valid tokens}.

    A `lax.scan` over chunks whose body is `jax.checkpoint`-ed: the backward pass recomputes one chunk's
    logits at a time, so only [B, C, V] logits (not [B, T, V]) are ever live. The teacher logits are
    stop-gradient'ed (and recomputed in the backward pass, which costs one extra teacher head matmul).
    """
    if student_hidden.ndim != 3:
        raise ValueError(f"student_hidden must be [B, T, D], got shape {student_hidden.shape}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head must be given together (or both None)")
    b, t = student_hidden.shape[:2]
    for name, x in [("teacher_hidden", teacher_hidden), ("mask", mask)] + [
        (f"token_args[{i}]", a) for i, a in enumerate(token_args)
    ]:
        if x is not None and tuple(x.shape[:2]) != (b, t):
            raise ValueError(f"{name} must start with [B, T] = {(b, t)}, got shape {x.shape}")
    chunk_size = int(min(chunk_size, t))
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t

    def split(x):  # [B, T, ...] -> [n_chunks, B, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk_size, *x.shape[2:]), 1, 0)

    valid = jnp.asarray(mask) != 0
    xs = (
        split(student_hidden),
        None if teacher_hidden is None else split(teacher_hidden),
        split(valid),
        tuple(split(jnp.asarray(a)) for a in token_args),
    )

    def chunk_sums(s_h, t_h, m, args):
        s_logits = student_head(s_h)
        t_logits = None if t_h is None else jax.lax.stop_gradient(teacher_head(t_h))
        out = loss_fn(s_logits, t_logits, *args)
        return jax.tree.map(lambda v: jnp.sum(jnp.where(m, _float(v), 0.0)), out)

    first = jax.tree.map(lambda x: x[0], xs)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sums, *first))
    body = jax.checkpoint(chunk_sums)

    def step(carry, x):
        return jax.tree.map(jnp.add, carry, body(*x)), None

    sums, _ = jax.lax.scan(step, init, xs)
    count = jnp.sum(valid)
    value = jax.tree.map(lambda s: s / jnp.maximum(count, 1).astype(s.dtype), sums)
    return value, {"sum": sums, "count": count}


# ------------------------------------------------------------------------------------------------------------
# Feature-level alignment (minillm.md section 4).


class FeatureProjector(nnx.Module):
    """Learned linear map student width -> teacher width (FitNets), applied to the student features.

    Trained jointly with the student (it is part of the trainable state) and dropped at export. No bias by
    default; lecun-normal init keeps the projected variance close to the input's.
    """

    def __init__(
        self,
        d_student: int,
        d_teacher: int,
        rngs: nnx.Rngs,
        *,
        use_bias: bool = False,
        param_dtype: Any = jnp.float32,
    ):
        self.d_student, self.d_teacher = d_student, d_teacher
        self.linear = nnx.Linear(d_student, d_teacher, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.d_student:
            raise ValueError(f"FeatureProjector expects last dim {self.d_student}, got shape {x.shape}")
        return self.linear(x)


def _unit(x: Array, eps: float = 1e-8) -> Array:
    """x / max(|x|, eps) along the last axis (NaN-free gradient at x = 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def _standardise(x: Array, eps: float = 1e-6) -> Array:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


FEATURE_KINDS = ("cosine", "mse", "mse_std")


def feature_alignment_per_token(
    student_feats: Array,
    teacher_feats: Array,
    *,
    kind: str = "cosine",
    proj: Callable[[Array], Array] | None = None,
) -> Array:
    """Per-token distance between (projected) student and teacher features, [..., D] -> [...].

    kind: "cosine" -> 1 - cos(s, t); "mse" -> mean_d (s - t)^2; "mse_std" -> the same after standardising each
    token over its channels (insensitive to the LLaMA outlier channels' scale).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature alignment kind must be one of {FEATURE_KINDS}, got {kind!r}")
    s = student_feats if proj is None else proj(student_feats)
    s, t = _float(s), jax.lax.stop_gradient(_float(teacher_feats))
    if s.shape != t.shape:
        raise ValueError(
            f"student features {s.shape} (after proj) do not match teacher features {t.shape}; "
            "pass proj=FeatureProjector(d_student, d_teacher, rngs) when the widths differ"
        )
    if kind == "cosine":
        return 1.0 - jnp.sum(_unit(s) * _unit(t), axis=-1)
    if kind == "mse_std":
        s, t = _standardise(s), _standardise(t)
    return jnp.mean(jnp.square(s - t), axis=-1)


def feature_alignment_loss(
    student_feats: Array,
    teacher_feats: Array,
    mask: Array,
    *,
    kind: str = "cosine",
    proj: Callable[[Array], Array] | None = None,
) -> Array:
    """Masked token mean of `feature_alignment_per_token` (features [B, N, D], mask [B, N])."""
    return masked_mean(feature_alignment_per_token(student_feats, teacher_feats, kind=kind, proj=proj), mask)


def relation_alignment_loss(student_feats: Array, teacher_feats: Array, mask: Array) -> Array:
    """RDist-style relation alignment: MSE between token cosine-similarity matrices (needs no width map).

    S[b, i, j] = cos(f[b, i], f[b, j]); mean over valid pairs (both tokens valid) of (S_student - S_teacher)².
    Memory is [B, N, N] (N = 1296 image tokens at 504 px: 6.7 MB per sample in fp32).
    """
    s = _unit(_float(student_feats))
    t = _unit(jax.lax.stop_gradient(_float(teacher_feats)))
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"student {s.shape} and teacher {t.shape} features must have the same tokens")
    valid = jnp.asarray(mask) != 0
    pairs = valid[:, :, None] & valid[:, None, :]
    diff = jnp.einsum("bid,bjd->bij", s, s) - jnp.einsum("bid,bjd->bij", t, t)
    return masked_mean(jnp.square(diff), pairs)


def cross_modal_alignment(
    student_h: Array,
    teacher_h: Array,
    image_mask: Array,
    answer_mask: Array,
    *,
    kind: str = "cosine",
    proj: Callable[[Array], Array] | None = None,
    relation: bool = False,
) -> dict[str, Array]:
    """Feature alignment with image-token and answer-token groups averaged SEPARATELY.

    Separate means keep ~1296 image tokens from swamping ~10² answer tokens. Returns dict(image=..., text=...)
    and, with relation=True, also relation=... (token-similarity alignment over the image tokens).
    """
    per_token = feature_alignment_per_token(student_h, teacher_h, kind=kind, proj=proj)
    out = {"image": masked_mean(per_token, image_mask), "text": masked_mean(per_token, answer_mask)}
    if relation:
        out["relation"] = relation_alignment_loss(student_h, teacher_h, image_mask)
    return out
