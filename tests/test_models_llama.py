"""LLaMA decoder vs transformers' LlamaForCausalLM (float32): hidden states, logits, padding, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_models_testlib import abstract, assert_close, causal_lm, randomize_, state_dict_np

from rskd_jax.convert import from_torch
from rskd_jax.models import LlamaModel, get_preset

CFG = get_preset("tiny").text  # 3 layers, 4 heads / 2 KV heads (GQA), head_dim 16


@pytest.fixture(scope="module")
def hf_llama():
    hf_cfg = from_torch.hf_llava_config(get_preset("tiny")).text_config
    return randomize_(transformers.LlamaForCausalLM(hf_cfg).eval(), seed=1)


def ours(hf_model, scan=True, remat="none"):
    m = abstract(lambda: LlamaModel(CFG, scan=scan, remat=remat, rngs=nnx.Rngs(0)))
    return from_torch.load_params(
        m, from_torch.llama_params_from_hf_state_dict(CFG, state_dict_np(hf_model), scan=scan)
    )


def positions_of(mask):
    return np.maximum(np.cumsum(mask, 1) - 1, 0)


def hf_forward(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions_of(mask)),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("scan", [True, False])
def test_llama_matches_hf(hf_llama, scan):
    """Rows: unpadded, left-padded, right-padded."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :5] = 0
    mask[2, 9:] = 0
    ids = np.where(mask == 1, ids, 0)
    ref = hf_forward(hf_llama, ids, mask)
    model = ours(hf_llama, scan=scan)
    n = CFG.num_layers
    f = nnx.jit(lambda m, i, a: causal_lm(m, i, a, return_hidden=tuple(range(n + 1))))
    logits, hidden, _ = f(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    assert len(ref.hidden_states) == n + 1
    for i in range(n + 1):
        assert_close(np.asarray(hidden[i])[valid], ref.hidden_states[i].numpy()[valid], what=f"hidden {i}")
    assert_close(np.asarray(logits)[valid], ref.logits.numpy()[valid], what="logits")
    assert np.abs(ref.logits.numpy()).max() > 1.0  # the reference is not near-trivial


def test_return_hidden_subset_negative_and_logits_alias(hf_llama):
    """Asking for a subset (negative indices too) under scan gives exactly those, equal to HF's."""
    ids = np.random.default_rng(1).integers(3, CFG.vocab_size, (2, 8))
    mask = np.ones_like(ids)
    ref = hf_forward(hf_llama, ids, mask)
    model = ours(hf_llama, scan=True)
    last, hidden, _ = nnx.jit(lambda m, i: m(m.embed(i), return_hidden=(-2, 1)))(model, jnp.asarray(ids))
    assert sorted(hidden) == [-2, 1]
    assert_close(hidden[-2], ref.hidden_states[-2].numpy(), what="hidden -2")
    assert_close(hidden[1], ref.hidden_states[1].numpy(), what="hidden 1")
    assert_close(last, ref.hidden_states[-1].numpy(), what="last (post-norm)")
    with pytest.raises(ValueError, match="outside"):
        model(model.embed(jnp.asarray(ids)), return_hidden=(CFG.num_layers + 1,))


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_incremental_equals_full_forward(hf_llama, scan):
    """Left-padded prompts of different lengths: prefill + one-token steps == HF full forward, every step."""
    rng = np.random.default_rng(2)
    p, steps = 7, 5
    prompt = rng.integers(3, CFG.vocab_size, (2, p))
    pmask = np.ones((2, p), np.int64)
    pmask[1, :3] = 0  # row 1: 4-token prompt, left-padded
    prompt = np.where(pmask == 1, prompt, 0)
    new = rng.integers(3, CFG.vocab_size, (2, steps))
    full_ids = np.concatenate([prompt, new], 1)
    full_mask = np.concatenate([pmask, np.ones((2, steps), np.int64)], 1)
    ref = hf_forward(hf_llama, full_ids, full_mask).logits.numpy()

    model = ours(hf_llama, scan=scan)
    step = nnx.jit(lambda m, ids, mask, cache: causal_lm(m, ids, mask, cache=cache))
    cache = model.init_cache(2, p + steps)
    logits, _, cache = step(model, jnp.asarray(prompt), jnp.asarray(pmask), cache)
    valid = pmask.astype(bool)
    assert_close(np.asarray(logits)[valid], ref[:, :p][valid], what="prefill logits")
    for s in range(steps):
        logits, _, cache = step(model, jnp.asarray(new[:, s : s + 1]), jnp.ones((2, 1), jnp.int32), cache)
        assert_close(logits[:, 0], ref[:, p + s], what=f"decode step {s}")
    assert int(cache.index) == p + steps
    np.testing.assert_array_equal(cache.next_pos, full_mask.sum(1))


def test_remat_policies_same_loss_and_grads(hf_llama):
    ids = jnp.asarray(np.random.default_rng(3).integers(3, CFG.vocab_size, (2, 8)))

    def loss_and_grads(model):
        loss = lambda m: jnp.mean(jax.nn.logsumexp(causal_lm(m, ids)[0], -1))
        return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model)

    ref_loss, ref_grads = loss_and_grads(ours(hf_llama, scan=True, remat="none"))
    for scan, policy in [(True, "full"), (False, "dots_saveable")]:
        loss, grads = loss_and_grads(ours(hf_llama, scan=scan, remat=policy))
        assert_close(loss, ref_loss, tol=1e-6, what=policy)
        g = (
            grads["layers"]["q_proj"]["kernel"][...]
            if scan
            else jnp.stack([grads["layers"][i]["q_proj"]["kernel"][...] for i in range(CFG.num_layers)])
        )
        assert_close(g, ref_grads["layers"]["q_proj"]["kernel"][...], tol=1e-5, what=f"{policy} grads")


def test_custom_attn_mask_packs_two_continuations_like_two_hf_forwards(hf_llama):
    """One forward over [prompt + answer A | continuation B] with a mask that hides A from B gives, for
    B's tokens, transformers' logits of prompt + B (and, for the first segment, those of prompt + A)."""
    rng = np.random.default_rng(3)
    p, a, r = 7, 5, 4
    prompt = rng.integers(3, CFG.vocab_size, (2, p))
    ans, cont = rng.integers(3, CFG.vocab_size, (2, a)), rng.integers(3, CFG.vocab_size, (2, r))
    seg1 = np.concatenate([prompt, ans], 1)
    ids = np.concatenate([seg1, cont], 1)
    t = p + a
    idx = np.arange(t + r)
    causal = idx[None, :] <= idx[:, None]
    hide_answer = (idx[:, None] >= t) & (idx[None, :] >= p) & (idx[None, :] < t)
    mask = np.broadcast_to(causal & ~hide_answer, (2, t + r, t + r))
    pos = np.concatenate([np.arange(t), p + np.arange(r)])[None].repeat(2, 0)
    model = ours(hf_llama)
    f = nnx.jit(lambda m, i, pp, mm: m.logits(m(m.embed(i), positions=pp, attn_mask=mm)[0]))
    logits = np.asarray(f(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
    ones = lambda x: np.ones(x.shape, np.int64)
    ref1 = hf_forward(hf_llama, seg1, ones(seg1)).logits.numpy()
    two = np.concatenate([prompt, cont], 1)
    ref2 = hf_forward(hf_llama, two, ones(two)).logits.numpy()
    assert_close(logits[:, :t], ref1, tol=1e-4, what="first segment")
    assert_close(logits[:, t:], ref2[:, p:], tol=1e-4, what="packed continuation")
    with pytest.raises(ValueError, match="explicit positions"):
        model(model.embed(jnp.asarray(ids)), attn_mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match="attn_mask shape"):
        model(model.embed(jnp.asarray(ids)), positions=jnp.asarray(pos), attn_mask=jnp.asarray(mask[:, :3]))
