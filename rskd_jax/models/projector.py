"""Vision -> language projector: `mlp2x_gelu` (Linear, exact erf GELU, Linear) or `linear`."""

from __future__ import annotations

import jax
from flax import nnx

from rskd_jax.models.layers import Linear, constrain


class Projector(nnx.Module):
    """HF names: linear_1 (+ linear_2 for mlp2x_gelu), both with bias."""

    def __init__(self, kind: str, vision_dim: int, text_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if kind not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type={kind!r}; expected 'mlp2x_gelu' or 'linear'")
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(vision_dim, text_dim, (None, "embed"), **kw)
        self.linear_2 = nnx.data(
            Linear(text_dim, text_dim, ("mlp", "embed"), **kw) if kind == "mlp2x_gelu" else None
        )
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.linear_1(x)
        if self.linear_2 is not None:
            x = self.linear_2(jax.nn.gelu(x, approximate=False))
        return constrain(x, ("batch", "seq", "embed"))
