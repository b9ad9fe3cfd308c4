"""CLIP vision transformer (HF `CLIPVisionModel` numerics) and GeoChat's position-table resize.

Hidden states follow HF: hidden_states[0] is the embedding after `pre_layrnorm`, hidden_states[i] the
output of encoder layer i. `post_layernorm` only feeds the pooled (CLS) output. Inputs are NHWC.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rskd_jax.models.layers import (
    LayerNorm,
    Linear,
    attention_heads,
    constrain,
    make_param,
    normal,
    run_layers,
    stacked,
)
from rskd_jax.models.presets import VisionConfig

ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@flax.struct.dataclass
class ClipOutput:
    last_hidden_state: jax.Array  # [B, N+1, D], output of the last layer (no post-LN), like HF
    pooler_output: jax.Array  # [B, D] post_layernorm(CLS)
    hidden_states: tuple | None = None  # num_layers+1 arrays when asked for


class ClipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.q_proj = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.v_proj = Linear(d, d, ("embed", "heads"), use_bias=True, **kw)
        self.out_proj = Linear(d, d, ("heads", "embed"), use_bias=True, **kw)
        self.ln2 = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.fc1 = Linear(d, m, ("embed", "mlp"), use_bias=True, **kw)
        self.fc2 = Linear(m, d, ("mlp", "embed"), use_bias=True, **kw)
        self.num_heads, self.act, self.attention_impl = cfg.num_heads, cfg.hidden_act, attention_impl

    def __call__(self, h: jax.Array) -> jax.Array:
        x = self.ln1(h)
        split = lambda lin: constrain(
            lin.split_heads(x, self.num_heads), ("batch", "heads", "seq", "head_dim")
        )
        q, k, v = split(self.q_proj), split(self.k_proj), split(self.v_proj)
        o = attention_heads(q, k, v, None, self.attention_impl)
        h = h + checkpoint_name(self.out_proj.merge_heads(o), "attn_out")
        x = constrain(ACTS[self.act](self.fc1(self.ln2(h))), ("batch", "seq", "mlp"))
        h = h + checkpoint_name(self.fc2(x), "mlp_out")
        return constrain(h, ("batch", "seq", "embed"))


class ClipVisionModel(nnx.Module):
    """Patch conv (no bias) + CLS + learned positions, pre-LN, encoder layers, post-LN on the pooled CLS."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan: bool = True,
        remat: str = "none",
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = make_param(
            rngs, normal, (p, p, cfg.num_channels, d), (None, None, None, "embed"), param_dtype
        )
        self.class_embed = make_param(rngs, normal, (d,), ("embed",), param_dtype)
        self.pos_embed = make_param(rngs, normal, (cfg.num_positions, d), (None, "embed"), param_dtype)
        self.pre_ln = LayerNorm(d, cfg.layer_norm_eps, **kw)
        make = lambda r: ClipLayer(
            cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=r
        )
        self.layers = (
            stacked(make, cfg.num_layers, rngs)
            if scan
            else nnx.List([make(rngs) for _ in range(cfg.num_layers)])
        )
        self.post_ln = LayerNorm(d, cfg.layer_norm_eps, **kw)
        self.cfg, self.dtype, self.scan, self.remat = cfg, dtype, scan, remat

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """NHWC pixels -> [B, 1+N, D] after pre_layrnorm (= hidden_states[0])."""
        cfg = self.cfg
        b, hgt, wid, c = pixel_values.shape
        if (hgt, wid, c) != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"pixel_values must be NHWC [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
                f"for this CLIP config, got {pixel_values.shape}"
            )
        g, p = cfg.grid, cfg.patch_size
        x = pixel_values.astype(self.dtype).reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = jnp.einsum("bhwijc,ijcd->bhwd", x, self.patch_embed[...].astype(self.dtype)).reshape(b, g * g, -1)
        cls = jnp.broadcast_to(self.class_embed[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], 1) + self.pos_embed[...].astype(self.dtype)
        return constrain(self.pre_ln(x), ("batch", "seq", "embed"))

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> ClipOutput:
        h = self.embed(pixel_values)
        n = self.cfg.num_layers
        keep = output_hidden_states
        buf = jnp.zeros((n,) + h.shape, h.dtype) if keep else None

        def body(layer, carry, i):
            h, buf = carry
            h = layer(h)
            return h, (buf.at[i].set(h) if keep else None)

        last, buf = run_layers(self.layers, body, (h, buf), jnp.arange(n), scan=self.scan, policy=self.remat)
        pooled = self.post_ln(last[:, 0])
        hidden = (h,) + tuple(buf[i] for i in range(n)) if keep else None
        return ClipOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)

    def hidden_state(self, pixel_values: jax.Array, index: int) -> jax.Array:
        """hidden_states[index] (negative allowed), computing only the layers it needs."""
        n = self.cfg.num_layers
        if not -(n + 1) <= index <= n:
            raise ValueError(f"hidden-state index {index} outside [-{n + 1}, {n}] for a {n}-layer CLIP")
        index %= n + 1
        h = self.embed(pixel_values)
        if index == 0:
            return h
        if not self.scan:
            return run_layers(
                self.layers[:index],
                lambda layer, h, _: layer(h),
                h,
                jnp.arange(index),
                scan=False,
                policy=self.remat,
            )
        # Scanned: layers >= index are skipped with lax.cond (no copy of the stacked weights).
        if index == n:
            body = lambda layer, h, i: layer(h)
        else:
            body = lambda layer, h, i: jax.lax.cond(i < index, lambda: layer(h), lambda: h)
        return run_layers(self.layers, body, h, jnp.arange(n), scan=True, policy=self.remat)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2 (PyTorch's bicubic, A=-0.75)."""
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of 1-D bicubic resampling with align_corners=True and clamped borders."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    m = np.zeros((n_out, n_in), np.float64)
    for tap in range(4):
        np.add.at(m, (np.arange(n_out), np.clip(i0 - 1 + tap, 0, n_in - 1)), w[:, tap])
    return m


def interpolate_pos_table(table: np.ndarray, new_grid: int) -> np.ndarray:
    """GeoChat's position-table resize: keep the CLS row, bicubic(align_corners=True) resize the grid rows.

    table [1 + g*g, D] -> [1 + new_grid**2, D], computed in float64 and returned in table's dtype.
    """
    table = np.asarray(table)
    n, d = table.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f"position table has {n} rows; expected 1 + a square number (CLS + grid)")
    grid = table[1:].astype(np.float64).reshape(g, g, d)
    m = bicubic_matrix(g, new_grid)
    out = np.einsum("ih,hwd,jw->ijd", m, grid, m).reshape(new_grid * new_grid, d)
    return np.concatenate([table[:1].astype(np.float64), out], 0).astype(table.dtype)
