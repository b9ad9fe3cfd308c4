"""`loss.divergence`: the single-step term of the step on sampled responses, against written-out formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_distill_step import build, full_spec, make_batch

from rskd_jax.distill import losses as L
from rskd_jax.distill import rollout as R
from rskd_jax.distill import step as S


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(a, b):
    return np.sum(a * (np.log(a) - np.log(b)), -1)


REFERENCE = {  # p teacher, q student (numpy, float64)
    "rkl": lambda p, q: _kl(q, p),
    "fkl": lambda p, q: _kl(p, q),
    "skew_fkl": lambda p, q: _kl(p, 0.1 * p + 0.9 * q),
    "skew_rkl": lambda p, q: _kl(q, 0.9 * p + 0.1 * q),
    "jsd": lambda p, q: 0.5 * _kl(p, 0.5 * p + 0.5 * q) + 0.5 * _kl(q, 0.5 * p + 0.5 * q),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_token_divergence_names(name):
    """Each name of loss.divergence gives its divergence (written out in numpy) per token."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 11)), 2 * rng.normal(size=(2, 3, 11))
    got = np.asarray(L.token_divergence(name)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(got, REFERENCE[name](_softmax(t), _softmax(s)), rtol=1e-4, atol=1e-6)


def test_single_step_divergence_of_the_step():
    """loss/rkl of the step with loss.divergence=jsd == the written-out JSD between the two models'
    next-token distributions at the sampled response positions (same rollout key)."""
    name = "jsd"
    spec = dataclasses.replace(
        full_spec(),
        weights=dict(rkl=1.0),
        divergence=name,
        feature_layers=(),
        sampling=R.SamplingConfig(5, 0.2),
    )
    _, _, parts = build(spec)
    student = nnx.merge(parts["graphdef"], parts["params"], parts["frozen"])
    teacher = nnx.merge(parts["teacher_graphdef"], parts["teacher"])
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=4).items()}
    key = jax.random.key(7)
    _, metrics = nnx.jit(lambda *a: S.compute_loss(*a, spec))(student, teacher, batch, key)
    ro = nnx.jit(R.sample, static_argnums=5, static_argnames=("eos_id", "pad_id"))(
        student.model,
        teacher,
        batch["prompt_ids"],
        batch["prompt_mask"],
        key,
        spec.sampling,
        eos_id=spec.eos_id,
        pad_id=spec.pad_id,
        pixel_values=batch["pixel_values"],
    )
    ids = jnp.concatenate([batch["prompt_ids"], ro.tokens], 1)
    mask = jnp.concatenate([batch["prompt_mask"], ro.mask.astype(jnp.int32)], 1)
    at = jnp.broadcast_to(batch["prompt_ids"].shape[1] - 1 + jnp.arange(ro.tokens.shape[1]), ro.tokens.shape)
    q = _softmax(student.model(ids, batch["pixel_values"], mask, logits_at=at).logits)
    p = _softmax(teacher(ids, batch["pixel_values"], mask, logits_at=at).logits)
    m = np.asarray(ro.mask) > 0
    expect = REFERENCE[name](p, q)[m].mean()
    assert float(metrics["loss/rkl"]) == pytest.approx(expect, rel=2e-4, abs=1e-6)


def test_unknown_divergence_names_the_key():
    with pytest.raises(ValueError, match="loss.divergence='kl2'"):
        L.token_divergence("kl2")
