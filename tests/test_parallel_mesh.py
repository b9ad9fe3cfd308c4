"""8 simulated CPU devices, mesh (data, fsdp, tensor) = (2, 2, 2): sharded == single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_models_testlib import assert_close, llava_from_hf, randomize_

from rskd_jax.convert import from_torch
from rskd_jax.models import LlavaModel, get_preset
from rskd_jax.models.llama import cache_shardings
from rskd_jax.parallel import (
    init_sharded,
    logical_to_spec,
    make_mesh,
    named_shardings,
    shard_batch,
    shard_model,
)

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.fail("needs 8 devices: tests/conftest.py sets --xla_force_host_platform_device_count=8")
    return make_mesh((2, 2, 2))


def test_rules_table():
    m = make_mesh((2, 2, 2))
    assert logical_to_spec(("layers", "embed", "mlp"), (3, 64, 128), m) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (128, 64), m) == P("tensor", "fsdp")
    # Each mesh axis once: the residual stream shards batch over (data, fsdp) and leaves embed whole.
    assert logical_to_spec(("batch", "seq", "embed"), (4, 8, 64), m) == P(("data", "fsdp"), None, None)
    # Axes that do not divide a dimension are dropped (batch 2 over data*fsdp = 4 -> data only).
    assert logical_to_spec(("batch", "seq"), (2, 8), m) == P("data", None)
    assert logical_to_spec(("embed", "heads"), (33, 6), m) == P(None, "tensor")
    with pytest.raises(ValueError, match="devices"):
        make_mesh((2, 2, 3))
    assert make_mesh((1, -1, 2)).shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_sharded_forward_and_decode_equal_single_device(mesh):
    hf = randomize_(
        transformers.LlavaForConditionalGeneration(from_torch.hf_llava_config(CFG)).eval(), seed=6
    )
    model = llava_from_hf(CFG, hf)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (4, 20))
    ids[:, 2 : 2 + CFG.image_seq_length] = CFG.image_token_id
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    batch = dict(ids=ids, px=rng.standard_normal((4, 32, 32, 3)).astype(np.float32), mask=mask)
    nxt = jnp.asarray(rng.integers(3, 120, (4, 1)))

    def run(m, b, tok):
        out = m(b["ids"], b["px"], b["mask"], cache=m.init_cache(4, 24), return_hidden=(1,))
        step = m(tok, cache=out.cache)
        return out.logits, out.hidden_states[1], step.logits

    single = nnx.jit(run)(model, jax.tree.map(jnp.asarray, batch), nxt)
    with jax.set_mesh(mesh):
        shard_model(model, mesh)
        q = model.llm.layers.q_proj.kernel[...]
        assert q.sharding.spec == P(None, "fsdp", "tensor")
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (3, 32, 32)
        sb = shard_batch(batch, mesh)
        assert sb["ids"].sharding.spec == P(("data", "fsdp"), None)
        sharded = nnx.jit(run)(model, sb, nxt)
    for a, b, what in zip(sharded, single, ("logits", "hidden 1", "decode step")):
        assert_close(a, b, tol=1e-5, what=what)


def test_init_sharded_and_abstract_shardings(mesh):
    make = lambda: LlavaModel(CFG, rngs=nnx.Rngs(0))
    abstract_state = nnx.state(nnx.eval_shape(make))
    shardings = named_shardings(abstract_state, mesh)
    assert shardings["llm"]["embed_tokens"].spec == P("tensor", "fsdp")
    assert shardings["vision"]["layers"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
    model = init_sharded(make, mesh)
    emb = model.llm.embed_tokens[...]
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.addressable_shards[0].data.shape == (64, 32)
    # load_params keeps each weight's sharding (the converter loads into sharded models).
    tree = jax.tree.map(lambda x: 2 * np.asarray(x), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    from_torch.load_params(model, tree)
    emb2 = model.llm.embed_tokens[...]
    assert emb2.sharding == emb.sharding
    np.testing.assert_array_equal(np.asarray(emb2), 2 * np.asarray(emb))
    cache = model.init_cache(4, 8)
    specs = cache_shardings(cache, mesh)
    assert specs.k.spec == P(None, ("data", "fsdp"), "tensor", None, None)  # [L, B, K, S, Dh]


def test_splash_attention_under_mesh_uses_shard_map(mesh):
    """Splash (Pallas interpret mode on CPU), per shard via shard_map, == XLA attention; gradients too."""
    from rskd_jax.models import layers

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 20, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 20, 2, 16)), jnp.float32) for _ in range(2))
    valid = np.ones((4, 20), bool)
    valid[1, :6] = False
    mask = jnp.asarray(valid[:, None, :] & np.tril(np.ones((20, 20), bool))[None])
    ref = layers.attention(q, k, v, mask, "xla")
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, m: layers.attention(q, k, v, m, "splash_interpret"))(q, k, v, mask)
        full = jax.jit(lambda q, k, v: layers.attention(q, k, v, None, "splash_interpret"))(q, k, v)
    assert_close(np.asarray(out)[valid], np.asarray(ref)[valid], tol=1e-5, what="causal splash")
    assert_close(full, layers.attention(q, k, v, None, "xla"), tol=1e-5, what="full splash")
    # Backward (splash's custom VJP) matches XLA too, at real query rows.
    w = jnp.asarray(valid[:, :, None, None], jnp.float32)
    grads = lambda impl: jax.grad(
        lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, mask, impl)) * w), argnums=(0, 1, 2)
    )(q, k, v)
    for a, b, name in zip(grads("splash_interpret"), grads("xla"), "qkv"):
        assert_close(a, b, tol=1e-5, what=f"d{name}")
