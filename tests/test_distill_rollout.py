"""Rollout (teacher-mixed sampling, greedy decoding) vs independent references.

References: transformers' PyTorch Llava (logits, greedy `generate`), its logits warpers (temperature, top-k,
top-p) and a NumPy write-out of the same rules; distributions are checked with a chi-square goodness-of-fit
test on a 16-token vocabulary (fixed seeds, so the outcome is deterministic), including a power check that
the wrong model's distribution is rejected.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from flax import nnx
from test_distill_testlib import greedy_generate
from test_models_testlib import llava_from_hf, randomize_
from transformers.generation import logits_process as hf_lp

from rskd_jax.convert import from_torch
from rskd_jax.distill import rollout
from rskd_jax.models import get_preset

BASE = get_preset("tiny")
CFG = BASE.replace(text=dataclasses.replace(BASE.text, vocab_size=16), image_token_id=15)  # 15 text tokens
PAD = 0
# Text-only prompts (no image tokens): row 1 is left-padded by 2, row 2 by 1.
PROMPTS = np.array([[5, 9, 3, 11, 7, 4], [PAD, PAD, 6, 2, 13, 8], [PAD, 10, 1, 12, 3, 9]])
MASK = (np.arange(6)[None] >= np.array([0, 2, 1])[:, None]).astype(np.int64)


def hf_model(seed):
    return randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(CFG)).eval(), seed
    )


@pytest.fixture(scope="module")
def models():
    hf_s, hf_t = hf_model(3), hf_model(4)
    return hf_s, hf_t, llava_from_hf(CFG, hf_s), llava_from_hf(CFG, hf_t)


def hf_next_probs(hf, ids, mask):
    """Next-token distribution after each row (image token suppressed, renormalised), float64."""
    with torch.no_grad():
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        logits = (
            hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
            .logits[:, -1]
            .double()
            .numpy()
        )
    logits[:, CFG.image_token_id] = -np.inf
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ------------------------------------------------------------------------------------------------ warpers


def np_process(logits, temperature, top_k, top_p):
    """NumPy write-out: z = logits / T; drop z < k-th largest; drop tokens (descending order) whose
    preceding cumulative probability is already >= top_p, always keeping the most likely one."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    if top_p < 1:
        for row in z:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
            drop = before >= top_p
            drop[0] = False
            row[order[drop]] = -np.inf
    return z


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 0.7), (0.7, 5, 1.0), (1.3, 12, 0.8), (1.0, 3, 0.95), (0.5, 0, 0.3)]
)
def test_process_logits_matches_hf_warpers_and_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, 40)).astype(np.float32) * 2
    ours = np.asarray(rollout.process_logits(jnp.asarray(logits), temperature, top_k, top_p))
    warpers = [hf_lp.TemperatureLogitsWarper(temperature)]
    warpers += [hf_lp.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [hf_lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
    ref = torch.tensor(logits)
    for w in warpers:
        ref = w(None, ref)
    ref = ref.numpy()
    npref = np_process(logits, temperature, top_k, top_p)
    for other in (ref, npref):
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(other))
        np.testing.assert_allclose(ours[np.isfinite(ours)], other[np.isfinite(other)], rtol=1e-6)
    kept = np.isfinite(ours).sum(1)
    assert kept.min() >= 1 and kept.max() < 40  # the filters did something, and never everything


def test_top_p_boundary_follows_hf():
    """Exact ties with the threshold: 4 equal tokens (p = 0.25 each) and top_p = 0.5 keep 2, not 3 (HF removes
    a token once the tokens before it already reach top_p)."""
    logits = np.zeros((1, 4), np.float32)
    ours = np.asarray(rollout.process_logits(jnp.asarray(logits), 1.0, 0, 0.5))
    ref = hf_lp.TopPLogitsWarper(0.5)(None, torch.tensor(logits)).numpy()
    assert np.isfinite(ours).sum() == np.isfinite(ref).sum() == 2
    assert np.isfinite(np.asarray(rollout.process_logits(jnp.asarray(logits), 1.0, 0, 0.0))).sum() == 1


# ----------------------------------------------------------------------------------- first-step distribution


def chi2_pvalue(counts, probs):
    """Goodness-of-fit p-value; categories expected < 5 are pooled into one bin."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.concatenate([counts[~small], [counts[small].sum()]])
    exp = np.concatenate([expected[~small], [expected[small].sum()]])
    keep = exp > 0
    assert (obs[~keep] == 0).all(), "a token with zero probability was sampled"
    return scipy.stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.4])
def test_first_step_matches_mixture(models, alpha):
    hf_s, hf_t, student, teacher = models
    n = 3000
    row = 1  # the left-padded prompt
    ids = np.repeat(PROMPTS[row : row + 1], n, 0)
    mask = np.repeat(MASK[row : row + 1], n, 0)
    cfg = rollout.SamplingConfig(max_new_tokens=1, alpha=alpha)
    r = nnx.jit(lambda s, t, i, m, k: rollout.sample(s, t, i, m, k, cfg, eos_id=-1, pad_id=PAD))(
        student, teacher, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(7)
    )
    tok = np.asarray(r.tokens[:, 0])
    q = hf_next_probs(hf_s, PROMPTS[row : row + 1], MASK[row : row + 1])[0]
    p = hf_next_probs(hf_t, PROMPTS[row : row + 1], MASK[row : row + 1])[0]
    mix = alpha * p + (1 - alpha) * q
    counts = np.bincount(tok, minlength=16).astype(np.float64)
    assert counts[CFG.image_token_id] == 0
    assert chi2_pvalue(counts, mix) > 1e-3
    if alpha in (0.0, 1.0):  # power: the other model's distribution is clearly rejected
        assert chi2_pvalue(counts, q if alpha == 1 else p) < 1e-6
    np.testing.assert_allclose(np.asarray(r.student_logprobs[:, 0]), np.log(q[tok]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.teacher_logprobs[:, 0]), np.log(p[tok]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.weights[:, 0]), q[tok] / mix[tok], rtol=2e-4)
    assert (np.asarray(r.mask) == 1).all() and (np.asarray(r.lengths) == 1).all()


# ------------------------------------------------------------------------------------ greedy, EOS, padding


def test_greedy_matches_hf_generate_and_eos_stops_rows(models):
    hf_s, _, student, _ = models
    steps = 8
    run = nnx.jit(lambda m, i, a, eos: greedy_generate(m, i, a, steps, eos_id=eos, pad_id=PAD))
    full = run(student, jnp.asarray(PROMPTS), jnp.asarray(MASK), jnp.int32(-1))  # no EOS: all 8 steps
    with torch.no_grad():
        ref = hf_s.generate(
            input_ids=torch.tensor(PROMPTS),
            attention_mask=torch.tensor(MASK),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD,
            suppress_tokens=[CFG.image_token_id],
        )[:, PROMPTS.shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(full.tokens), ref)
    assert (np.asarray(full.lengths) == steps).all()

    def expected(tokens, eos):
        out, lens = np.full_like(tokens, PAD), []
        for b, row in enumerate(tokens):
            hit = np.flatnonzero(row == eos)
            n = hit[0] + 1 if hit.size else len(row)
            out[b, :n] = row[:n]
            lens.append(n)
        return out, np.array(lens)

    # A token row 0 emits mid-way acts as EOS: row 0 stops there, others stop at their own first copy.
    eos = int(ref[0, 3])
    r = run(student, jnp.asarray(PROMPTS), jnp.asarray(MASK), jnp.int32(eos))
    want, lens = expected(ref, eos)
    assert lens[0] <= 4
    np.testing.assert_array_equal(np.asarray(r.tokens), want)
    np.testing.assert_array_equal(np.asarray(r.lengths), lens)
    np.testing.assert_array_equal(
        np.asarray(r.mask), (np.arange(steps)[None] < lens[:, None]).astype(np.float32)
    )
    # Every row done at step 0 (row 1's prompt three times): the loop exits at once, all pads after.
    same, same_mask = np.stack([PROMPTS[1]] * 3), np.stack([MASK[1]] * 3)
    r0 = run(student, jnp.asarray(same), jnp.asarray(same_mask), jnp.int32(int(ref[1, 0])))
    np.testing.assert_array_equal(np.asarray(r0.tokens[:, 0]), [ref[1, 0]] * 3)
    assert (np.asarray(r0.tokens[:, 1:]) == PAD).all() and (np.asarray(r0.lengths) == 1).all()


def test_mixed_sampling_with_filters_stays_finite_and_pads_after_eos(models):
    """alpha > 0 with top-k on both models: teacher-chosen tokens can be outside the student's top-k (log q =
    -inf); finished rows must still carry exact zeros, never NaN."""
    hf_s, hf_t, student, teacher = models
    n, steps = 64, 6
    cfg = rollout.SamplingConfig(max_new_tokens=steps, alpha=0.5, top_k=3, temperature=0.8)
    ids, mask = (
        np.tile(PROMPTS, (n // 3 + 1, 1))[:n],
        np.tile(MASK, (n // 3 + 1, 1))[:n],
    )  # rows cycle 0, 1, 2
    eos = 9
    r = nnx.jit(lambda s, t, i, m, k: rollout.sample(s, t, i, m, k, cfg, eos_id=eos, pad_id=PAD))(
        student, teacher, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1)
    )
    tok, m = np.asarray(r.tokens), np.asarray(r.mask)
    for a in (r.student_logprobs, r.teacher_logprobs, r.weights):
        a = np.asarray(a)
        assert not np.isnan(a).any()
        assert (a[m == 0] == 0).all()
    assert (tok[m == 0] == PAD).all()
    for b in range(n):
        hit = np.flatnonzero(tok[b] == eos)
        n_valid = hit[0] + 1 if hit.size else steps
        assert m[b].sum() == n_valid == int(r.lengths[b])
    assert (m.sum(1) < steps).any()  # some rows did stop early
    # Step 0: every token lies in the union of the two models' top-3 (temperature does not change the order).
    for row in range(3):
        q = hf_next_probs(hf_s, PROMPTS[row : row + 1], MASK[row : row + 1])[0]
        p = hf_next_probs(hf_t, PROMPTS[row : row + 1], MASK[row : row + 1])[0]
        allowed = set(np.argsort(-q)[:3]) | set(np.argsort(-p)[:3])
        assert set(tok[row::3, 0]) <= allowed
    # log q = -inf where the teacher picked a token outside the student's top-3 (then weight 0).
    lq, w = np.asarray(r.student_logprobs), np.asarray(r.weights)
    assert ((lq == -np.inf) == ((w == 0) & (m > 0))).all()
