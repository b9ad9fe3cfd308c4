"""Distillation losses vs independent references.

References are written out here as plain NumPy loops from the formulas in ../shared/reference/minillm.md,
plus straightforward PyTorch ports of MiniLLM's `_pg_loss`, `_reg_loss`, `_get_advantages_and_returns`,
`whiten` and `get_rev_kl` (microsoft/LMOps minillm/minillm/{losses,utils}.py) for the code conventions.
Gradients are checked against float64 central finite differences; the chunked evaluation against the
unchunked one; and its memory against the unchunked one with an AOT `memory_analysis` at V=32000, T=1024.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_distill_testlib as LS  # the scalar (masked mean) forms
import torch
from flax import nnx

from rskd_jax.distill import losses as L

B, T, V = 3, 6, 11


# ------------------------------------------------------------------------------------------------------------
# Inputs and NumPy references.


def make_case(seed=0, b=B, t=T, v=V, dtype=np.float32):
    """Random student/teacher logits with padding and -inf entries.

    * a shared top-k style filter (both models -inf at the same entries) at several positions;
    * a student-only -inf entry and a teacher-only -inf entry (exercise the 0·log 0 conventions);
    * mask rows of different lengths, one row fully valid, padded positions carry finite logits.
    """
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, t, v)) * 2.0
    te = rng.normal(size=(b, t, v)) * 2.0
    for bi, ti in [(0, 0), (1, 2), (2, 4)][:b]:
        drop = rng.choice(v, size=v // 2, replace=False)
        s[bi, ti, drop] = -np.inf
        te[bi, ti, drop] = -np.inf
    s[0, 1, v // 2] = -np.inf
    te[1, 0, v - 1] = -np.inf
    mask = np.ones((b, t), np.int32)
    mask[0, t - 2 :] = 0
    mask[1, 3:] = 0
    return s.astype(dtype), te.astype(dtype), mask


def np_log_softmax(row, tau=1.0):
    z = np.asarray(row, np.float64) / tau
    finite = np.isfinite(z)
    mx = z[finite].max()
    lse = mx + math.log(sum(math.exp(zi - mx) for zi in z[finite]))
    return np.where(finite, z - lse, -np.inf)


def np_token_values(s, te, mask, per_token):
    """Masked token mean of per_token(lp_row, lq_row) by explicit loops."""
    total, count = 0.0, 0
    for bi in range(s.shape[0]):
        for ti in range(s.shape[1]):
            if mask[bi, ti]:
                total += per_token(te[bi, ti], s[bi, ti])
                count += 1
    return total / max(count, 1)


def np_kl(la, lb, support):
    """sum over `support` of a (log a - log b)."""
    return sum(math.exp(la[i]) * (la[i] - lb[i]) for i in range(len(la)) if support[i])


def ref_forward_kl(s, te, mask, tau=1.0):
    def f(t_row, s_row):
        lp, lq = np_log_softmax(t_row, tau), np_log_softmax(s_row, tau)
        return np_kl(lp, lq, np.isfinite(lp) & np.isfinite(lq))

    return np_token_values(s, te, mask, f)


def ref_reverse_kl(s, te, mask, tau=1.0):
    def f(t_row, s_row):
        lp, lq = np_log_softmax(t_row, tau), np_log_softmax(s_row, tau)
        return np_kl(lq, lp, np.isfinite(lp) & np.isfinite(lq))

    return np_token_values(s, te, mask, f)


def np_kl_to_mixture(a, m):
    """KL(a || m) in probability space, 0·log 0 = 0."""
    return sum(a[i] * (math.log(a[i]) - math.log(m[i])) for i in range(len(a)) if a[i] > 0)


def ref_skew_forward(s, te, mask, alpha=0.1, tau=1.0):
    def f(t_row, s_row):
        p, q = np.exp(np_log_softmax(t_row, tau)), np.exp(np_log_softmax(s_row, tau))
        return np_kl_to_mixture(p, alpha * p + (1 - alpha) * q)

    return np_token_values(s, te, mask, f)


def ref_skew_reverse(s, te, mask, alpha=0.1, tau=1.0):
    def f(t_row, s_row):
        p, q = np.exp(np_log_softmax(t_row, tau)), np.exp(np_log_softmax(s_row, tau))
        return np_kl_to_mixture(q, (1 - alpha) * p + alpha * q)

    return np_token_values(s, te, mask, f)


def ref_gjsd(s, te, mask, beta, tau=1.0):
    if beta == 0:  # TRL's special-cased endpoints: plain forward / reverse KL
        return ref_forward_kl(s, te, mask, tau)
    if beta == 1:
        return ref_reverse_kl(s, te, mask, tau)

    def f(t_row, s_row):
        p, q = np.exp(np_log_softmax(t_row, tau)), np.exp(np_log_softmax(s_row, tau))
        m = beta * p + (1 - beta) * q
        return beta * np_kl_to_mixture(p, m) + (1 - beta) * np_kl_to_mixture(q, m)

    return np_token_values(s, te, mask, f)


# ------------------------------------------------------------------------------------------------------------
# PyTorch ports of MiniLLM's code (from minillm.md's description of microsoft/LMOps minillm/minillm/).


def torch_pg_loss(logprobs, old_logprobs, advantages, mask, w, cliprange):
    n = mask.sum()
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio.float()) * w
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(pg1, pg2).float() * mask) / n


def torch_reg_loss(logits, t_logits, inf_mask, mask):
    """xent(q, p) - entropy(q) with MiniLLM's inf-mask handling (get_x_entropy / get_entropy)."""
    logits = logits.masked_fill(inf_mask, -float("inf"))
    t_logits = t_logits.masked_fill(inf_mask, -float("inf"))
    x_mask = torch.isinf(logits) | torch.isinf(t_logits) | inf_mask
    probs = torch.softmax(logits, -1)
    xent = -torch.sum(probs * torch.log_softmax(t_logits, -1).masked_fill(x_mask, 0), -1) * mask
    e_mask = torch.isinf(logits) | inf_mask
    ent = -torch.sum(probs * torch.log_softmax(logits, -1).masked_fill(e_mask, 0), -1) * mask
    return torch.sum((xent - ent) * mask) / mask.sum()


def torch_whiten_global(xs):
    """MiniLLM `whiten` via `get_global_statistics` (the multi-rank path: biased variance)."""
    mean = xs.sum() / xs.numel()
    var = torch.sum((xs - mean) ** 2) / xs.numel()
    return (xs - mean) * torch.rsqrt(var + 1e-8)


def torch_advantages(rewards, mask, gamma, use_whitening):
    rewards, mask = rewards.float(), mask.float()
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last_rw, rw_reversed = 0, []
    for t in reversed(range(rewards.shape[1])):
        last_rw = rewards[:, t] + gamma * last_rw
        rw_reversed.append(last_rw)
    adv = torch.stack(rw_reversed[::-1], dim=1) / lens
    return torch_whiten_global(adv) if use_whitening else adv


def torch_rev_kl_logged(log_p, log_q, mask):
    log_ratio = (log_p - log_q) * mask
    kl = log_ratio.exp() - 1 - log_ratio
    return (kl.sum(-1) / mask.sum(-1)).mean()


# ------------------------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_divergences_match_numpy(tau):
    s, te, mask = make_case(0)
    got = {
        "fkl": LS.forward_kl(s, te, mask, temperature=tau),
        "rkl": LS.reverse_kl(s, te, mask, temperature=tau),
        "sfkl": LS.skew_forward_kl(s, te, mask, temperature=tau),
        "srkl": LS.skew_reverse_kl(s, te, mask, alpha=0.3, temperature=tau),
        "jsd0": LS.generalized_jsd(s, te, mask, beta=0.0, temperature=tau),
        "jsd.3": LS.generalized_jsd(s, te, mask, beta=0.3, temperature=tau),
        "jsd.5": LS.generalized_jsd(s, te, mask, beta=0.5, temperature=tau),
        "jsd1": LS.generalized_jsd(s, te, mask, beta=1.0, temperature=tau),
    }
    want = {
        "fkl": ref_forward_kl(s, te, mask, tau),
        "rkl": ref_reverse_kl(s, te, mask, tau),
        "sfkl": ref_skew_forward(s, te, mask, 0.1, tau),
        "srkl": ref_skew_reverse(s, te, mask, 0.3, tau),
        "jsd0": ref_gjsd(s, te, mask, 0.0, tau),
        "jsd.3": ref_gjsd(s, te, mask, 0.3, tau),
        "jsd.5": ref_gjsd(s, te, mask, 0.5, tau),
        "jsd1": ref_gjsd(s, te, mask, 1.0, tau),
    }
    for k in want:
        assert np.isfinite(float(got[k])), k
        np.testing.assert_allclose(float(got[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # Sanity of the definitions themselves: all divergences are > 0 here, and 0 for identical inputs.
    assert min(want.values()) > 0
    for fn in (LS.forward_kl, LS.reverse_kl, LS.skew_forward_kl, LS.skew_reverse_kl, LS.generalized_jsd):
        assert abs(float(fn(s, s, mask))) < 1e-6
        # The teacher is a constant.
        assert not np.any(np.asarray(jax.grad(fn, argnums=1)(jnp.asarray(s), jnp.asarray(te), mask)))


def test_reverse_kl_matches_minillm_reg_loss_value_and_grad():
    s, te, mask = make_case(1)
    inf_mask = np.isinf(s) & np.isinf(te)  # MiniLLM applies the sampler's inf_mask to both models
    s_t = torch.tensor(np.where(np.isinf(s), 0.0, s), dtype=torch.float64, requires_grad=True)
    ref = torch_reg_loss(
        s_t,
        torch.tensor(np.where(np.isinf(te), 0.0, te), dtype=torch.float64),
        torch.tensor(inf_mask),
        torch.tensor(mask, dtype=torch.float64),
    )
    ref.backward()
    # Shared filter only (the port's masked_fill reproduces exactly that set of -inf entries).
    s_shared = np.where(inf_mask, -np.inf, np.where(np.isinf(s), 0.0, s)).astype(np.float32)
    te_shared = np.where(inf_mask, -np.inf, np.where(np.isinf(te), 0.0, te)).astype(np.float32)
    val, grad = jax.value_and_grad(LS.reverse_kl)(jnp.asarray(s_shared), jnp.asarray(te_shared), mask)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), s_t.grad.numpy(), atol=1e-6)
    assert np.all(np.asarray(grad)[inf_mask] == 0)


def test_policy_gradient_matches_minillm_pg_loss_value_and_grad():
    rng = np.random.default_rng(2)
    lp = rng.normal(size=(B, T)) * 0.3 - 2.0
    old = lp + rng.normal(size=(B, T)) * 0.3  # ratios on both sides of the clip range
    adv = rng.normal(size=(B, T))
    w = rng.uniform(0.6, 1.4, size=(B, T))
    _, _, mask = make_case(0)
    for eps in (0.2, 0.1):
        lp_t = torch.tensor(lp, requires_grad=True)
        mask_t = torch.tensor(mask, dtype=torch.float64)
        ref = torch_pg_loss(lp_t, torch.tensor(old), torch.tensor(adv), mask_t, torch.tensor(w), eps)
        ref.backward()
        f = lambda x, eps=eps: LS.policy_gradient_loss(x, old, adv, mask, weights=w, clip_eps=eps)
        val, grad = jax.value_and_grad(f)(jnp.asarray(lp, jnp.float32))
        np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad), lp_t.grad.numpy(), rtol=1e-5, atol=1e-6)
        clipped = np.abs(np.exp(lp - old) * w - 1) > eps
        assert clipped[mask == 1].any() and (~clipped[mask == 1]).any()  # both regimes exercised
    # No weights = weights of one.
    ones = np.ones_like(w)
    np.testing.assert_allclose(
        float(LS.policy_gradient_loss(lp, old, adv, mask)),
        float(LS.policy_gradient_loss(lp, old, adv, mask, weights=ones)),
        rtol=1e-6,
    )


def ref_paper_advantages(r, mask, gamma, include_current, length_norm, whiten):
    b, t = r.shape
    adv = np.zeros((b, t))
    for bi in range(b):
        for ti in range(t):
            start = ti if include_current else ti + 1
            g = sum(gamma ** (k - start) * r[bi, k] * mask[bi, k] for k in range(start, t))
            n = sum(mask[bi, k] for k in range(start, t))
            adv[bi, ti] = g / max(n, 1) if length_norm else g
    if whiten:
        vals = adv[mask == 1]
        adv = (adv - vals.mean()) / math.sqrt(vals.var() + 1e-8)
    return np.where(mask == 1, adv, 0.0)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("length_norm,whiten", [(True, False), (False, False), (True, True)])
def test_long_term_advantages_match_numpy(gamma, include_current, length_norm, whiten):
    rng = np.random.default_rng(3)
    r = rng.normal(size=(B, T))
    _, _, mask = make_case(0)
    got = L.long_term_advantages(
        r, mask, gamma=gamma, include_current=include_current, length_norm=length_norm, whiten=whiten
    )
    want = ref_paper_advantages(r, mask, gamma, include_current, length_norm, whiten)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_long_term_advantages_match_minillm_code_convention():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(B, T))
    _, _, mask = make_case(0)
    r = r * mask  # MiniLLM's stored rewards are 0 past the response
    ref = torch_advantages(torch.tensor(r), torch.tensor(mask), 0.95, use_whitening=False).numpy()
    got = L.long_term_advantages(r, mask, gamma=0.95, include_current=True, length_norm=True, whiten=False)
    np.testing.assert_allclose(np.asarray(got)[mask == 1], ref[mask == 1], rtol=1e-5, atol=1e-6)
    # With no padding, valid-token whitening is MiniLLM's whitening.
    full = np.ones_like(mask)
    ref_w = torch_advantages(torch.tensor(r), torch.tensor(full), 0.95, use_whitening=True).numpy()
    got_w = L.long_term_advantages(r, full, gamma=0.95, include_current=True, whiten=True)
    np.testing.assert_allclose(np.asarray(got_w), ref_w, rtol=1e-4, atol=1e-5)
    # With padding it is not (MiniLLM includes the pads in the statistics) -- the documented difference.
    ref_pad = torch_advantages(torch.tensor(r), torch.tensor(mask), 0.95, use_whitening=True).numpy()
    got_pad = L.long_term_advantages(r, mask, gamma=0.95, include_current=True, whiten=True)
    assert np.abs(np.asarray(got_pad)[mask == 1] - ref_pad[mask == 1]).max() > 1e-2


def test_k3_estimate_token_logprobs_and_cross_entropy():
    # (The importance weights and rewards are computed where they are used: the weights in rollout.py, tested
    # against q / p~ in test_distill_rollout.py; the rewards inside the step's policy-gradient term.)
    rng = np.random.default_rng(5)
    lq = np.log(rng.uniform(0.01, 1, size=(B, T)))
    lp = np.log(rng.uniform(0.01, 1, size=(B, T)))
    _, _, mask = make_case(0)
    ref = torch_rev_kl_logged(torch.tensor(lp), torch.tensor(lq), torch.tensor(mask, dtype=torch.float64))
    np.testing.assert_allclose(float(L.k3_reverse_kl_estimate(lp, lq, mask)), ref.item(), rtol=1e-5)
    d = (lp - lq)[mask == 1]
    np.testing.assert_allclose(
        float(L.k3_reverse_kl_estimate(lp, lq, mask, per_sequence=False)),
        np.mean(np.exp(d) - 1 - d),
        rtol=1e-5,
    )

    s, _, _ = make_case(6)
    ids = rng.integers(0, V, size=(B, T))
    ids[0, 0] = int(np.flatnonzero(np.isfinite(s[0, 0]))[0])
    for tau in (1.0, 0.8):
        want = np.array([[np_log_softmax(s[bi, ti], tau)[ids[bi, ti]] for ti in range(T)] for bi in range(B)])
        got = np.asarray(L.token_logprobs(s, ids, tau))
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-6)
        assert np.all(np.isneginf(got[~np.isfinite(want)]))
    ce_want = np.mean([-np_log_softmax(s[1, ti])[ids[1, ti]] for ti in range(3)])
    ce = LS.cross_entropy(s[1:2, :3], ids[1:2, :3], np.ones((1, 3)))
    np.testing.assert_allclose(float(ce), ce_want, rtol=1e-5)


def np_unit(x):
    return x / max(np.linalg.norm(x), 1e-8)


def test_feature_and_relation_alignment_match_numpy():
    rng = np.random.default_rng(7)
    n, ds, dt = 5, 6, 8
    hs, ht = rng.normal(size=(2, n, ds)), rng.normal(size=(2, n, dt))
    img = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    ans = np.array([[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    proj = L.FeatureProjector(ds, dt, nnx.Rngs(0))
    k = np.asarray(proj.linear.kernel[...], np.float64)
    hp = hs @ k

    def ref_tok(kind, a, b):
        if kind == "cosine":
            return 1 - np.dot(np_unit(a), np_unit(b))
        if kind == "mse_std":
            a, b = (a - a.mean()) / np.sqrt(a.var() + 1e-6), (b - b.mean()) / np.sqrt(b.var() + 1e-6)
        return np.mean((a - b) ** 2)

    def ref_group(kind, m):
        vals = [ref_tok(kind, hp[i, j], ht[i, j]) for i in range(2) for j in range(n) if m[i, j]]
        return np.mean(vals)

    for kind in ("cosine", "mse", "mse_std"):
        out = L.cross_modal_alignment(hs, ht, img, ans, kind=kind, proj=proj, relation=True)
        np.testing.assert_allclose(float(out["image"]), ref_group(kind, img), rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(float(out["text"]), ref_group(kind, ans), rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(
            float(L.feature_alignment_loss(hs, ht, img + ans, kind=kind, proj=proj)),
            ref_group(kind, img + ans),
            rtol=1e-5,
            err_msg=kind,
        )

    # Relation alignment: cosine-similarity matrices over valid pairs; widths may differ (no map).
    tot, cnt = 0.0, 0
    for i in range(2):
        for a in range(n):
            for b in range(n):
                if img[i, a] and img[i, b]:
                    ss = np.dot(np_unit(hs[i, a]), np_unit(hs[i, b]))
                    st = np.dot(np_unit(ht[i, a]), np_unit(ht[i, b]))
                    tot, cnt = tot + (ss - st) ** 2, cnt + 1
    np.testing.assert_allclose(float(out["relation"]), tot / cnt, rtol=1e-5)
    np.testing.assert_allclose(float(L.relation_alignment_loss(hs, ht, img)), tot / cnt, rtol=1e-5)

    # The projector is trainable through the loss with nnx transforms (and the gradient is the closure's).
    g_nnx = nnx.grad(lambda p: L.feature_alignment_loss(hs, ht, img, proj=p))(proj)
    g_ref = jax.grad(lambda kk: L.feature_alignment_loss(hs, ht, img, proj=lambda x: x @ kk))(jnp.asarray(k))
    np.testing.assert_allclose(np.asarray(g_nnx.linear.kernel[...]), np.asarray(g_ref), rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    hs, ht, m = np.ones((1, 2, 3)), np.ones((1, 2, 4)), np.ones((1, 2))
    with pytest.raises(ValueError, match="FeatureProjector"):
        L.feature_alignment_loss(hs, ht, m)
    with pytest.raises(ValueError, match="kind"):
        L.feature_alignment_loss(hs, hs, m, kind="l1")
    with pytest.raises(ValueError, match="beta"):
        LS.generalized_jsd(hs, hs, m, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        LS.reverse_kl(hs, hs, m, temperature=0.0)
    with pytest.raises(ValueError, match="expects last dim"):
        L.FeatureProjector(4, 5, nnx.Rngs(0))(hs)
    with pytest.raises(ValueError, match=r"mask must start with \[B, T\]"):
        L.chunked_token_loss(hs, None, lambda h: h, None, np.ones((1, 3)), L.masked_mean)


def test_all_padding_gives_zero_not_nan():
    s, te, _ = make_case(0)
    zero = np.zeros((B, T))
    for fn in (LS.forward_kl, LS.reverse_kl, LS.skew_forward_kl, LS.skew_reverse_kl, LS.generalized_jsd):
        v, g = jax.value_and_grad(fn)(jnp.asarray(s), jnp.asarray(te), zero)
        assert float(v) == 0.0 and np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------------------------------------------------
# Gradients vs float64 finite differences.


def fd_check(f, x, eps=1e-6, rtol=1e-6, atol=1e-9):
    """Central differences of scalar f at every finite coordinate of x (float64); grads must be finite."""
    f = jax.jit(f)
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    assert np.all(np.isfinite(grad))
    fd = np.zeros_like(x)
    for idx in zip(*np.nonzero(np.isfinite(x))):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = (float(f(jnp.asarray(xp))) - float(f(jnp.asarray(xm)))) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=rtol, atol=atol)
    assert np.abs(fd).max() > 1e-3  # the check is not vacuous


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        s, te, mask = make_case(8, b=2, t=3, v=5, dtype=np.float64)
        mask = np.array([[1, 1, 0], [1, 1, 1]])
        for name, fn in [
            ("fkl", lambda x: LS.forward_kl(x, te, mask, temperature=0.8)),
            ("rkl", lambda x: LS.reverse_kl(x, te, mask, temperature=0.8)),
            ("sfkl", lambda x: LS.skew_forward_kl(x, te, mask)),
            ("srkl", lambda x: LS.skew_reverse_kl(x, te, mask)),
            ("jsd", lambda x: LS.generalized_jsd(x, te, mask, beta=0.3)),
        ]:
            # x64 really is on: the function value is float64.
            assert fn(jnp.asarray(s)).dtype == jnp.float64, name
            fd_check(fn, s)

        rng = np.random.default_rng(9)
        lp = rng.normal(size=(2, 3)) * 0.1 - 1.0
        old = lp + np.array([[0.05, -0.4, 0.0], [0.3, 0.01, -0.02]])
        adv, w = rng.normal(size=(2, 3)), rng.uniform(0.8, 1.2, size=(2, 3))
        fd_check(lambda x: LS.policy_gradient_loss(x, old, adv, mask, weights=w, clip_eps=0.2), lp)

        hs, ht = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5))
        k = rng.normal(size=(3, 5))
        m = np.array([[1, 1, 1, 0], [1, 0, 1, 1]])
        for kind in ("cosine", "mse", "mse_std"):

            def wrt_feats(x, kind=kind):
                return L.feature_alignment_loss(x, ht, m, kind=kind, proj=lambda h: h @ k)

            def wrt_map(kk, kind=kind):
                return L.feature_alignment_loss(hs, ht, m, kind=kind, proj=lambda h: h @ kk)

            fd_check(wrt_feats, hs)
            fd_check(wrt_map, k)
        fd_check(lambda x: L.relation_alignment_loss(x, ht, m), hs)


# ------------------------------------------------------------------------------------------------------------
# Chunked evaluation.


def test_chunked_equals_unchunked_value_and_grad():
    rng = np.random.default_rng(10)
    b, t, ds, dt, v = 2, 10, 6, 8, 13
    hs = jnp.asarray(rng.normal(size=(b, t, ds)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(b, t, dt)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(ds, v)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(dt, v)), jnp.float32)
    mask = np.ones((b, t), np.int32)
    mask[0, 7:] = 0
    ids = rng.integers(0, v, size=(b, t))
    old = rng.normal(size=(b, t)) * 0.2 - 2.5
    adv = rng.normal(size=(b, t))
    w = rng.uniform(0.8, 1.2, size=(b, t))

    def terms(s_logits, t_logits, ids, old, adv, w):
        lq = L.token_logprobs(s_logits, ids)
        return {
            "rkl": L.reverse_kl_per_token(s_logits, t_logits),
            "fkl": L.forward_kl_per_token(s_logits, t_logits, temperature=0.9),
            "pg": L.policy_gradient_per_token(lq, old, adv, w, clip_eps=0.2),
        }

    def chunked(ws, hs, chunk):
        val, aux = L.chunked_token_loss(
            hs,
            ht,
            lambda h: h @ ws,
            lambda h: h @ wt,
            mask,
            terms,
            chunk_size=chunk,
            token_args=(ids, old, adv, w),
        )
        return val["rkl"] + 0.5 * val["fkl"] + val["pg"], (val, aux)

    def unchunked(ws, hs):
        s_logits, t_logits = hs @ ws, ht @ wt
        lq = L.token_logprobs(s_logits, ids)
        val = {
            "rkl": LS.reverse_kl(s_logits, t_logits, mask),
            "fkl": LS.forward_kl(s_logits, t_logits, mask, temperature=0.9),
            "pg": LS.policy_gradient_loss(lq, old, adv, mask, weights=w, clip_eps=0.2),
        }
        return val["rkl"] + 0.5 * val["fkl"] + val["pg"], val

    (u, uval), ug = jax.value_and_grad(unchunked, argnums=(0, 1), has_aux=True)(ws, hs)
    for chunk in (4, 5, 10):  # 4 does not divide T (padded last chunk)
        (c, (cval, aux)), cg = jax.jit(
            jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True), static_argnums=2
        )(ws, hs, chunk)
        np.testing.assert_allclose(float(c), float(u), rtol=1e-5)
        for k in uval:
            np.testing.assert_allclose(float(cval[k]), float(uval[k]), rtol=1e-5, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(float(aux["sum"][k]) / float(aux["count"]), float(uval[k]), rtol=1e-5)
        assert int(aux["count"]) == mask.sum()
        for a, e in zip(cg, ug):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)

    # Student-only terms (teacher None), single array output: SFT cross-entropy.
    ce, aux = L.chunked_token_loss(
        hs,
        None,
        lambda h: h @ ws,
        None,
        mask,
        lambda s, _t, y: -L.token_logprobs(s, y),
        chunk_size=3,
        token_args=(ids,),
    )
    np.testing.assert_allclose(float(ce), float(LS.cross_entropy(hs @ ws, ids, mask)), rtol=1e-5)


def test_chunked_loss_temp_memory_is_3x_lower_aot():
    """AOT (nothing allocated): temp memory of value_and_grad(reverse KL) wrt the student head + hidden."""
    b, t, d, v, chunk = 1, 1024, 256, 32000, 128
    sds = jax.ShapeDtypeStruct
    args = (
        sds((d, v), jnp.float32),
        sds((b, t, d), jnp.float32),
        sds((d, v), jnp.float32),
        sds((b, t, d), jnp.float32),
        sds((b, t), jnp.int32),
    )

    def unchunked(ws, hs, wt, ht, mask):
        return LS.reverse_kl(hs @ ws, ht @ wt, mask)

    def chunked(ws, hs, wt, ht, mask):
        val, _ = L.chunked_token_loss(
            hs, ht, lambda h: h @ ws, lambda h: h @ wt, mask, L.reverse_kl_per_token, chunk_size=chunk
        )
        return val

    def temp_bytes(f):
        c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        return c.memory_analysis().temp_size_in_bytes

    full, chunked_bytes = temp_bytes(unchunked), temp_bytes(chunked)
    logits_bytes = b * t * v * 4
    print(
        f"temp bytes: unchunked {full / 2**20:.1f} MiB, chunked {chunked_bytes / 2**20:.1f} MiB "
        f"(one fp32 [B,T,V] logits = {logits_bytes / 2**20:.1f} MiB)"
    )
    assert full >= 2 * logits_bytes  # the unchunked program really holds both models' full logits
    assert chunked_bytes * 3 <= full
    assert chunked_bytes < logits_bytes  # not even one model's full logits is live
