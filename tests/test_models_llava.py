"""LLaVA model vs transformers' LlavaForConditionalGeneration (float32), KV cache, API options, key map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_models_testlib import assert_close, llava_from_hf, randomize_, state_dict_np

from rskd_jax.convert import from_torch
from rskd_jax.models import LlavaModel, get_preset

CFG = get_preset("tiny")  # 16 image tokens, image_token_id 127
N = CFG.image_seq_length
P = 24  # prompt length: 3 text + 16 image + 5 text (row 1 left-padded by 4)


@pytest.fixture(scope="module")
def hf_llava():
    return randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(CFG)).eval(), seed=2
    )


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (2, P))
    mask = np.ones((2, P), np.int64)
    ids[0, 3 : 3 + N] = CFG.image_token_id
    mask[1, :4] = 0
    ids[1, :4] = 0
    ids[1, 6 : 6 + N] = CFG.image_token_id
    px = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    return ids, mask, px


def positions_of(mask):
    return np.maximum(np.cumsum(mask, 1) - 1, 0)


def hf_forward(hf, ids, mask, px):
    with torch.no_grad():
        return hf(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions_of(mask)),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("scan", [True, False])
def test_llava_matches_hf(hf_llava, batch, scan):
    ids, mask, px = batch
    ref = hf_forward(hf_llava, ids, mask, px)
    model = llava_from_hf(CFG.replace(scan_layers=scan), hf_llava)
    n = CFG.text.num_layers
    out = nnx.jit(lambda m, i, p, a: m(i, p, a, return_hidden=tuple(range(n + 1))))(
        model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)
    )
    valid = mask.astype(bool)
    for i in range(n + 1):
        assert_close(
            np.asarray(out.hidden_states[i])[valid], ref.hidden_states[i].numpy()[valid], what=f"hidden {i}"
        )
    assert_close(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], what="logits")
    assert_close(out.last_hidden, out.hidden_states[n], tol=0, what="last_hidden")
    with torch.no_grad():
        feats = hf_llava.model.get_image_features(torch.tensor(px).permute(0, 3, 1, 2)).pooler_output
    assert_close(out.image_features, torch.stack(list(feats)).numpy(), what="image features")


def test_options_vision_features_logits_at_no_logits(hf_llava, batch):
    ids, mask, px = batch
    model = llava_from_hf(CFG, hf_llava)
    ref = hf_forward(hf_llava, ids, mask, px).logits.numpy()

    @nnx.jit
    def run(m, ids, px, mask, at):
        vf = m.vision_features(px)  # computed once, shared (e.g. by teacher and student)
        a = m(ids, None, mask, vision_features=vf, logits_at=at)
        b = m(ids, px, mask, compute_logits=False, return_hidden=(-1,))
        return vf, a, b, m.logits(b.last_hidden)

    at = np.array([[P - 1, 10], [P - 1, 5]])
    vf, a, b, lg = run(model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), jnp.asarray(at))
    assert vf.shape == (2, N, CFG.vision.hidden_size)
    assert_close(a.logits, np.take_along_axis(ref, at[..., None], 1), what="logits_at")
    assert b.logits is None
    assert_close(lg[mask.astype(bool)], ref[mask.astype(bool)], what="model.logits(last_hidden)")
    assert a.logits.dtype == jnp.float32


def test_llava_kv_cache_matches_hf_full_forward(hf_llava, batch):
    """Prefill the image prompt (a left-padded row), then one-token steps == HF on the full sequence."""
    ids, mask, px = batch
    steps = 4
    new = np.random.default_rng(5).integers(3, 120, (2, steps))
    full_ids = np.concatenate([ids, new], 1)
    full_mask = np.concatenate([mask, np.ones((2, steps), np.int64)], 1)
    ref = hf_forward(hf_llava, full_ids, full_mask, px).logits.numpy()
    model = llava_from_hf(CFG, hf_llava)
    prefill = nnx.jit(lambda m, i, p, a, c: m(i, p, a, cache=c, logits_at=jnp.full((2, 1), P - 1)))
    step = nnx.jit(lambda m, i, c: m(i, cache=c))
    out = prefill(model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask), model.init_cache(2, P + steps))
    assert_close(out.logits[:, 0], ref[:, P - 1], what="prefill last logits")
    cache = out.cache
    for s in range(steps):
        out = step(model, jnp.asarray(new[:, s : s + 1]), cache)
        cache = out.cache
        assert_close(out.logits[:, 0], ref[:, P + s], what=f"step {s}")


def test_split_merge_jax_jit_and_bf16(hf_llava, batch):
    """nnx.split + jax.jit (the trainer's path) equals nnx.jit; bf16 compute with fp32 params stays close."""
    ids, mask, px = batch
    model = llava_from_hf(CFG, hf_llava)
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, i, p, a: nnx.merge(graphdef, s)(i, p, a).logits)
    logits = f(state, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask))
    ref = hf_forward(hf_llava, ids, mask, px).logits.numpy()
    valid = mask.astype(bool)
    assert_close(np.asarray(logits)[valid], ref[valid], what="split/merge jax.jit")
    m16 = llava_from_hf(CFG.replace(dtype="bfloat16"), hf_llava)
    assert m16.llm.embed_tokens.dtype == jnp.float32
    l16 = nnx.jit(lambda m, i, p, a: m(i, p, a).logits)(
        m16, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)
    )
    assert l16.dtype == jnp.float32
    assert_close(np.asarray(l16)[valid], ref[valid], tol=0.05, what="bf16 compute")  # measured 0.078/3.9


def test_image_token_count_mismatch_raises(hf_llava, batch):
    ids, mask, px = batch
    model = llava_from_hf(CFG, hf_llava)
    bad = ids.copy()
    bad[0, 3] = 5  # row 0 now has N-1 image tokens
    with pytest.raises(ValueError, match="image tokens"):
        model(jnp.asarray(bad), jnp.asarray(px), jnp.asarray(mask))
    with pytest.raises(ValueError, match="image tokens"):
        model(jnp.asarray(ids), None, jnp.asarray(mask))  # image tokens but no image


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_accelerator_attention_impls_refuse_cpu(hf_llava, batch, impl):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("CPU-only check")
    ids, mask, px = batch
    model = llava_from_hf(CFG.replace(attention_impl=impl), hf_llava)
    with pytest.raises(NotImplementedError, match=impl):
        model(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask))


def test_key_map_roundtrip_layouts_and_errors(hf_llava):
    sd = state_dict_np(hf_llava)
    for scan in (True, False):
        cfg = CFG.replace(scan_layers=scan)
        tree = from_torch.llava_params_from_hf_state_dict(cfg, sd)
        back = from_torch.to_hf_state_dict(cfg, tree)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # 4.x llava-hf on-disk layout is accepted too.
    old = {
        k.replace("model.language_model.", "language_model.model.")
        .replace("model.vision_tower.", "vision_tower.vision_model.")
        .replace("model.multi_modal_projector.", "multi_modal_projector.")
        .replace("lm_head.", "language_model.lm_head."): v
        for k, v in sd.items()
    }
    tree_old = from_torch.llava_params_from_hf_state_dict(CFG, old)
    np.testing.assert_array_equal(tree_old["llm"]["lm_head"]["kernel"], sd["lm_head.weight"].T)
    with pytest.raises(KeyError, match="model.language_model.norm.weight"):
        from_torch.llava_params_from_hf_state_dict(
            CFG, {k: v for k, v in sd.items() if "language_model.norm" not in k}
        )
    with pytest.raises(ValueError, match="unexpected keys"):
        from_torch.llava_params_from_hf_state_dict(CFG, {**sd, "model.extra.weight": np.zeros(2)})
    model = nnx.eval_shape(lambda: LlavaModel(CFG, rngs=nnx.Rngs(0)))
    tree = from_torch.llava_params_from_hf_state_dict(CFG, sd)
    tree["llm"]["norm"]["scale"] = np.zeros(3)
    with pytest.raises(ValueError, match="llm.norm.scale"):
        from_torch.load_params(model, tree)


def test_config_from_hf_roundtrip():
    assert from_torch.config_from_hf(from_torch.hf_llava_config(CFG)) == CFG
    cfg = get_preset("geochat_7b")
    assert from_torch.config_from_hf(from_torch.hf_llava_config(cfg)) == cfg


def test_splash_attention_interpret_mode_matches_hf(hf_llava, batch):
    """The TPU splash path (Pallas kernel run in interpret mode on CPU): CLIP (full mask) + decoder (causal,
    left-padded row) give HF's logits at real positions; cached calls fall back to the XLA path."""

    ids, mask, px = batch
    model = llava_from_hf(CFG.replace(attention_impl="splash_interpret"), hf_llava)
    logits = nnx.jit(lambda m, i, p, a: m(i, p, a).logits)(
        model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask)
    )
    ref = hf_forward(hf_llava, ids, mask, px).logits.numpy()
    valid = mask.astype(bool)
    assert_close(np.asarray(logits)[valid], ref[valid], what="splash (interpret)")
