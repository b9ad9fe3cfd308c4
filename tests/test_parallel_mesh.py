"""8 simulated CPU devices, mesh (data, fsdp, tensor) = (2, 2, 2): sharded == single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_models_testlib import assert_close, llava_from_hf, randomize_

from rskd_jax.models import LlavaModel, from_torch, get_preset
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
