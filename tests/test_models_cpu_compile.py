"""rskd_jax.models.compiler_options: on XLA:CPU, bf16 weights are not copied to float32 all at once.

XLA:CPU computes 16-bit ops in float32; by default it hoists those converts out of while loops (the layer scan,
a decode loop) and schedules them first, so a compiled forward holds a float32 copy of every layer (2x the bf16
weights; 27 GB for GeoChat-7B). With the options each layer is converted next to its dots. Measured at size in
bench/real_size.py; here the mechanism, at a small size, from XLA's own accounting of the compiled program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rskd_jax.models import LlamaModel, TextConfig, compiler_options

CFG = TextConfig(
    vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=2, num_kv_heads=2
)


@pytest.mark.parametrize("scan", [True, False])
def test_cpu_options_keep_bf16_weights_in_place(scan):
    model = LlamaModel(CFG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan=scan, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    weights = sum(x.nbytes for x in jax.tree.leaves(state))

    def decode_like(state, emb):  # the forward inside a while loop, as the rollout's decode steps run it
        m = nnx.merge(graphdef, state)
        return jax.lax.fori_loop(0, 2, lambda _, e: e + m(e)[0].astype(e.dtype), emb)

    emb = jax.random.normal(jax.random.key(1), (1, 8, CFG.hidden_size), jnp.bfloat16)
    default = jax.jit(decode_like).lower(state, emb).compile()
    kept = jax.jit(decode_like, compiler_options=compiler_options("cpu")).lower(state, emb).compile()
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    # Without the options: a float32 copy of all layers (if this fails, XLA:CPU changed; re-measure).
    assert temp(default) > 1.5 * weights, (temp(default), weights)
    assert temp(kept) < 0.5 * weights, (temp(kept), weights)
    np.testing.assert_array_equal(np.asarray(default(state, emb)), np.asarray(kept(state, emb)))


def test_options_only_on_cpu():
    assert compiler_options("cpu") and compiler_options("gpu") == {} and compiler_options("tpu") == {}
