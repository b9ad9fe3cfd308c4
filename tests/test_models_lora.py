"""LoRA: adapted forward == HF model with W + scale * (A @ B) (merged in NumPy); merge_lora; filters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from test_models_testlib import assert_close, llava_from_hf, randomize_, state_dict_np

from rskd_jax.convert import from_torch
from rskd_jax.models import LoRAConfig, apply_lora, get_preset, merge_lora, param_counts

CFG = get_preset("tiny")
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)  # scale 2


@pytest.fixture(scope="module")
def hf_llava():
    return randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(CFG)).eval(), seed=4
    )


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (2, 20))
    ids[:, 2 : 2 + CFG.image_seq_length] = CFG.image_token_id
    return jnp.asarray(ids), jnp.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))


def randomize_lora_b(model, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 100))
    for _, m in nnx.iter_modules(model):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.3 * jax.random.normal(next(keys), m.lora_b.shape)


def test_lora_forward_equals_merged_hf_and_merge_lora(hf_llava):
    """Scanned (stacked) adapters; the unscanned layout is checked in the next test."""
    scan = True
    cfg = CFG
    model = llava_from_hf(cfg, hf_llava)
    ids, px = inputs()
    fwd = nnx.jit(lambda m, i, p: m(i, p).logits)
    base = fwd(model, ids, px)
    apply_lora(model, LORA, rngs=nnx.Rngs(0))
    assert_close(fwd(model, ids, px), base, tol=1e-6, what="B=0 adapters change nothing")
    randomize_lora_b(model)
    adapted = fwd(model, ids, px)

    # Independent reference: torch model with W_torch + scale * (A @ B).T for each adapted layer.
    sd = state_dict_np(hf_llava)
    lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["llm"]["layers"]
    for i in range(cfg.text.num_layers):
        for name in LORA.targets:
            layer = {k: v[i] for k, v in lora[name].items()} if scan else lora[i][name]
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.language_model.layers.{i}.{group}.{name}.weight"
            sd[key] = sd[key] + LORA.scale * (np.asarray(layer["lora_a"]) @ np.asarray(layer["lora_b"])).T
    ref_model = transformers.LlavaForConditionalGeneration(hf_llava.config).eval()
    ref_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.tensor(np.asarray(ids)),
            pixel_values=torch.tensor(np.asarray(px)).permute(0, 3, 1, 2),
        ).logits.numpy()
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter
    assert_close(adapted, ref, what="LoRA forward vs merged HF")

    merge_lora(model)
    assert not nnx.state(model, nnx.LoRAParam)
    assert_close(fwd(model, ids, px), ref, what="after merge_lora")


def test_lora_targets_filter_dropout_and_training(hf_llava):
    model = llava_from_hf(CFG, hf_llava)
    apply_lora(model, LoRAConfig(), rngs=nnx.Rngs(0))  # GeoChat defaults: r=64, alpha=16, dropout 0.05
    lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    assert list(lora) == ["llm"]  # vision tower and projector untouched (their q_proj/linear_1 excluded)
    assert sorted(lora["llm"]["layers"]) == sorted(LoRAConfig().targets)
    assert lora["llm"]["layers"]["q_proj"]["lora_a"].shape == (CFG.text.num_layers, CFG.text.hidden_size, 64)
    assert param_counts(model)["lora"] == sum(x.size for x in jax.tree.leaves(lora))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoRAConfig(), rngs=nnx.Rngs(0))
    unscanned = apply_lora(
        llava_from_hf(CFG.replace(scan_layers=False), hf_llava), LoRAConfig(rank=8), rngs=nnx.Rngs(0)
    )
    assert unscanned.llm.layers[1].down_proj.lora_b.shape == (8, CFG.text.hidden_size)
    assert nnx.to_pure_dict(nnx.state(unscanned.llm.layers[2], nnx.LoRAParam)).keys() == set(
        LoRAConfig().targets
    )

    randomize_lora_b(model)
    ids, px = inputs()
    fwd = nnx.jit(lambda m, key: m(ids, px, dropout_rng=key).logits)
    no_drop = fwd(model, None)
    assert_close(fwd(model, None), no_drop, tol=0, what="deterministic without a key")
    assert np.abs(np.asarray(fwd(model, jax.random.key(0)) - no_drop)).max() > 1e-4

    frozen_before = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    lora_before = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, opt):
        loss_fn = lambda m: jnp.mean(jax.nn.logsumexp(m(ids, px).logits, -1))
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)

    train_step(model, opt)
    frozen_after = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
        lora_before,
    )
    assert min(jax.tree.leaves(moved)) > 0
