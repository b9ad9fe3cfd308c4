"""Helpers shared by the distillation tests (this file holds no tests).

The scalar (masked token mean) forms of the loss functions: the step reduces the `*_per_token` forms of
`rskd_jax.distill.losses` itself (`chunked_token_loss`), so these exist only to compare the per-token forms
with MiniLLM's / TRL's scalar losses. And greedy decoding of one model through the rollout loop.
"""

import jax
import jax.numpy as jnp

from rskd_jax.distill import losses as L
from rskd_jax.distill import rollout


def cross_entropy(logits, labels, mask, temperature: float = 1.0):
    """SFT / L_PT cross-entropy: masked token mean of -log q(label)."""
    return L.masked_mean(-L.token_logprobs(logits, labels, temperature), mask)


def forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """mean_t sum_v p (log p - log q) over valid tokens."""
    return L.masked_mean(L.forward_kl_per_token(student_logits, teacher_logits, temperature), mask)


def reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """mean_t sum_v q (log q - log p) over valid tokens: the single-step decomposition term."""
    return L.masked_mean(L.reverse_kl_per_token(student_logits, teacher_logits, temperature), mask)


def skew_forward_kl(student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0):
    """Masked token mean of `skew_forward_kl_per_token` (DistiLLM SKL, alpha 0.1 default)."""
    return L.masked_mean(
        L.skew_forward_kl_per_token(student_logits, teacher_logits, alpha, temperature), mask
    )


def skew_reverse_kl(student_logits, teacher_logits, mask, alpha: float = 0.1, temperature: float = 1.0):
    """Masked token mean of `skew_reverse_kl_per_token` (DistiLLM SRKL, alpha 0.1 default)."""
    return L.masked_mean(
        L.skew_reverse_kl_per_token(student_logits, teacher_logits, alpha, temperature), mask
    )


def generalized_jsd(student_logits, teacher_logits, mask, beta: float = 0.5, temperature: float = 1.0):
    """Masked token mean of `generalized_jsd_per_token` (TRL beta convention; see there)."""
    return L.masked_mean(L.generalized_jsd_per_token(student_logits, teacher_logits, beta, temperature), mask)


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, weights=None, clip_eps: float = 0.2):
    """Masked token mean of `policy_gradient_per_token` (MiniLLM `_pg_loss`; clip 0.2 default)."""
    valid = jnp.asarray(mask) != 0
    # Padded positions are excluded before exp (MiniLLM multiplies the log-ratio by the mask).
    logprobs = jnp.where(valid, jnp.asarray(logprobs), 0.0)
    old_logprobs = jnp.where(valid, jnp.asarray(old_logprobs), 0.0)
    per_token = L.policy_gradient_per_token(logprobs, old_logprobs, advantages, weights, clip_eps)
    return L.masked_mean(per_token, valid)


def greedy_generate(model, prompt_ids, prompt_mask, max_new_tokens: int, *, eos_id: int, pad_id: int):
    """Greedy decoding of one model: the rollout loop with alpha = 0 and argmax."""
    cfg = rollout.SamplingConfig(max_new_tokens=max_new_tokens, alpha=0.0, greedy=True)
    return rollout.sample(
        model, None, prompt_ids, prompt_mask, jax.random.key(0), cfg, eos_id=eos_id, pad_id=pad_id
    )
