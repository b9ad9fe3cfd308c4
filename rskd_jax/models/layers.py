"""Building blocks shared by the CLIP tower, the projector and the LLaMA decoder.

Conventions: Linear kernels are [in, out] (torch weight transposed); every weight is an `nnx.Param` whose
`out_sharding` metadata holds logical axis names (mapped to the mesh by rskd_jax/parallel/rules.py);
params are stored in `param_dtype` and cast to the compute `dtype` at use; norms and softmax run in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.parallel.rules import constrain, logical_to_spec

NEG_INF = float(np.finfo(np.float32).min)


def make_param(
    rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], names: Sequence[str | None], param_dtype
) -> nnx.Param:
    """An nnx.Param with logical axis names (not eagerly sharded: shard with parallel.rules)."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), param_dtype), out_sharding=tuple(names), eager_sharding=False)


normal = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). `names` = logical names of the kernel's (in, out) axes.

    Optional LoRA (added by rskd_jax.models.lora.apply_lora): y += dropout(x) @ lora_a @ lora_b * lora_scale.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        names: tuple[str | None, str | None],
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.kernel = make_param(rngs, normal, (din, dout), names, param_dtype)
        self.bias = nnx.data(make_param(rngs, zeros, (dout,), names[1:], param_dtype) if use_bias else None)
        self.dtype = dtype
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def _lora_input(self, x, dropout_rng):
        h = x
        if dropout_rng is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        return h

    def _project(self, x, dropout_rng, eqs: tuple[str, str, str], *, kernel, a, b, bias):
        """x @ kernel (+ bias) (+ LoRA: x @ A @ B). `eqs` are the einsums of the kernel, A and B; `kernel`, `a`,
        `b`, `bias` the shapes each weight is viewed in (-1 keeps the rest): the plain dot, or the projection
        written into / read from the head-major layout."""
        view = lambda p, shape: p[...].astype(self.dtype).reshape(shape)
        x = x.astype(self.dtype)
        y = jnp.einsum(eqs[0], x, view(self.kernel, kernel))
        if self.bias is not None:
            y = y + view(self.bias, bias)
        if self.lora_a is not None:
            h = jnp.einsum(eqs[1], self._lora_input(x, dropout_rng), view(self.lora_a, a))
            y = y + (jnp.einsum(eqs[2], h, view(self.lora_b, b)) * self.lora_scale).astype(self.dtype)
        return y

    def split_heads(self, x: jax.Array, num_heads: int, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [B, T, in] -> [B, num_heads, T, out // num_heads]: the projection written straight into the
        head-major layout attention wants (one dot, no transpose of the result on CPU/GPU)."""
        if x.shape[1] == 1:  # one token (decode): the plain dot; moving a size-1 axis is free
            return self(x, dropout_rng).reshape(x.shape[0], 1, num_heads, -1).swapaxes(1, 2)
        din, dout = self.kernel.shape
        heads = (-1, num_heads, dout // num_heads)
        eqs = ("btm,mhd->bhtd", "btm,mr->btr", "btr,rhd->bhtd")
        return self._project(x, dropout_rng, eqs, kernel=heads, a=(din, -1), b=heads, bias=(num_heads, 1, -1))

    def merge_heads(self, o: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """o [B, H, T, Dh] -> [B, T, out]: the output projection read straight from the head-major layout."""
        if o.shape[2] == 1:  # one token (decode): a free reshape, then the plain dot
            return self(o.swapaxes(1, 2).reshape(o.shape[0], 1, -1), dropout_rng)
        h, dh, dout = o.shape[1], o.shape[3], self.kernel.shape[1]
        eqs = ("bhtd,hdm->btm", "bhtd,hdr->btr", "btr,rm->btm")
        return self._project(o, dropout_rng, eqs, kernel=(h, dh, -1), a=(h, dh, -1), b=(-1, dout), bias=(-1,))

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        din, dout = self.kernel.shape
        eqs = ("...m,mn->...n", "...m,mr->...r", "...r,rn->...n")
        return self._project(x, dropout_rng, eqs, kernel=(din, dout), a=(din, -1), b=(-1, dout), bias=(dout,))


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = make_param(rngs, ones, (dim,), ("embed",), param_dtype)
        self.bias = make_param(rngs, zeros, (dim,), ("embed",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
            self.dtype
        )


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast to the compute dtype, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = make_param(rngs, ones, (dim,), ("embed",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_tables(positions: jax.Array, d: int, theta: float, dtype, *, heads_first: bool = False):
    """(cos, sin) of the rotary angles, [B, 1, T, D] (heads_first) or [B, T, 1, D]; computed once per
    forward and shared by every layer."""
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], -1)
    emb = emb[:, None, :, :] if heads_first else emb[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str = "xla"
) -> jax.Array:
    """Softmax attention with grouped KV heads. q [B,T,H,D], k/v [B,S,K,D], mask bool [B,T,S] (True=attend).

    The sequence-major wrapper of `attention_heads` (the models call that one directly).
    """
    t = lambda x: x.swapaxes(1, 2)
    return t(attention_heads(t(q), t(k), t(v), mask, impl))


def attention_heads(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, impl: str = "xla"
) -> jax.Array:
    """Softmax attention with grouped KV heads in the head-major layout: q [B,H,T,D], k/v [B,K,S,D],
    mask bool [B,T,S] (True = attend) -> [B,H,T,D]. Query head h reads KV head h // (H // K) (HF repeat_kv).

    impl 'xla': two batched dots + fp32 softmax (XLA fuses the mask/softmax); the operands already have
    their batch dims (B, K) leading, so no transposes are needed. Fully masked rows (pad queries) give a
    uniform average instead of NaN. 'cudnn': jax.nn.dot_product_attention(implementation='cudnn'), GPU and
    bf16/fp16 only. 'splash': the TPU Pallas kernel (TPU only); 'splash_interpret': the same kernel in Pallas
    interpret mode, on any platform (slow; for tests and debugging).
    """
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask)
    if impl in ("splash", "splash_interpret"):
        return _splash_attention(q, k, v, mask, interpret=impl == "splash_interpret")
    if impl != "xla":
        raise ValueError(f"attention_impl={impl!r}; expected 'xla', 'cudnn', 'splash' or 'splash_interpret'")
    b, h, t, d = q.shape
    kh = k.shape[1]
    q = q.reshape(b, kh, h // kh, t, d) * jnp.asarray(d**-0.5, q.dtype)
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", p, v).reshape(b, h, t, d)


CUDNN_NEEDS_GPU = "attention_impl='cudnn' needs an NVIDIA GPU; use 'xla' on CPU/TPU"


def sdpa_arguments(q, k, v, mask) -> dict:
    """What the cuDNN path passes to `jax.nn.dot_product_attention`, from the head-major q [B,H,T,D], k/v
    [B,K,S,D] and mask bool [B,T,S] (True = attend): q/k/v sequence-major (BTNH / BSKH; query head h reads KV
    head h // (H // K), as HF's repeat_kv), the mask as [B,1,T,S] with rows that attend no key (pad queries)
    opened to every key, so they stay finite. Scale: the function's default 1/sqrt(D)."""
    t = lambda x: x.swapaxes(1, 2)
    if mask is not None:
        mask = (mask | ~mask.any(-1, keepdims=True))[:, None]
    return dict(query=t(q), key=t(k), value=t(v), mask=mask)


def _cudnn_attention(q, k, v, mask):
    """cuDNN flash attention (GPU, bf16/fp16) on the head-major layout: [B,H,T,D] in and out."""
    if jax.devices()[0].platform != "gpu":
        raise NotImplementedError(CUDNN_NEEDS_GPU)
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16/float16 compute, got {q.dtype}")
    out = jax.nn.dot_product_attention(**sdpa_arguments(q, k, v, mask), implementation="cudnn")
    return out.swapaxes(1, 2)


SPLASH_BLOCK = 128


def _splash_attention(q, k, v, mask, interpret: bool = False):
    """TPU splash attention for full-sequence forwards (no KV cache): causal + key padding, or full (CLIP).

    Key padding becomes segment ids (pads 0, real tokens 1), so real queries never see pads; the sequence is
    padded to a multiple of SPLASH_BLOCK. Under a mesh the kernel runs per shard (shard_map over batch and
    heads, by the rules table). Pad query rows differ from the XLA path's (both are meaningless).
    """
    if jax.devices()[0].platform != "tpu" and not interpret:
        raise NotImplementedError(
            "attention_impl='splash' is the TPU Pallas kernel; use 'xla' (or 'cudnn' on GPU)"
        )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, h, t, d = q.shape
    if k.shape[2] != t:
        raise NotImplementedError("splash attention is for self-attention without a KV cache")
    causal = mask is not None
    # Without a cache the mask is key_valid & causal, so its last query row is the key validity.
    seg = mask[:, -1, :].astype(jnp.int32) if causal else jnp.ones((b, t), jnp.int32)
    pad = -t % SPLASH_BLOCK
    rep = h // k.shape[1]
    k, v = (jnp.repeat(x, rep, axis=1) if rep > 1 else x for x in (k, v))
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q * d**-0.5, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
    n = t + pad
    blocks = sk.BlockSizes(
        block_q=SPLASH_BLOCK,
        block_kv=SPLASH_BLOCK,
        block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK,
        block_kv_dkv=SPLASH_BLOCK,
        block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK,
        block_kv_dq=SPLASH_BLOCK,
    )

    def run(q, k, v, seg):  # one shard: q/k/v [b', h', n, d], seg [b', n]
        base = sm.CausalMask((n, n)) if causal else sm.FullMask((n, n))
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([base] * q.shape[1]),
            head_shards=1,
            q_seq_shards=1,
            block_sizes=blocks,
            interpret=interpret,
        )
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            q, k, v, seg
        )

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        spec = logical_to_spec(("batch", "heads", "seq", "head_dim"), q.shape, mesh)
        seg_spec = jax.sharding.PartitionSpec(spec[0], None)
        run = jax.shard_map(run, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False)
    return run(q, k, v, seg)[:, :, :t]


def remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
    """Wraps a layer function in jax.checkpoint per the config's `remat_policy` name."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=prevent_cse)
    if policy == "save_attn_mlp_out":
        pol = jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out")
    else:
        pol = getattr(jax.checkpoint_policies, policy, None)
        if pol is None:
            raise ValueError(f"unknown remat_policy {policy!r}")
    return jax.checkpoint(fn, policy=pol, prevent_cse=prevent_cse)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n layers with weights stacked on a leading `layers` axis (one module, for lax.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return make_layer(r)

    return make(rngs)


def run_layers(layers: nnx.Module, body: Callable, carry: Any, xs: Any, *, scan: bool, policy: str) -> Any:
    """carry = body(layer, carry, x_i) over the layers (stacked module + lax.scan, or an nnx.List).

    `xs` is a pytree of per-layer inputs with a leading layer axis. Each layer call is rematerialised
    per `policy`. The layers are split into (graphdef, state) so the same code runs under nnx.jit,
    jax.jit on split state, and nnx.grad.
    """
    if scan:
        graphdef, state = nnx.split(layers)

        def step(c, inp):
            s, x = inp
            return body(nnx.merge(graphdef, s), c, x), None

        return jax.lax.scan(remat(step, policy, prevent_cse=False), carry, (state, xs))[0]
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        fn = remat(lambda s, c, x, g=graphdef: body(nnx.merge(g, s), c, x), policy)
        carry = fn(state, carry, jax.tree.map(lambda a, i=i: a[i], xs))
    return carry


__all__ = [
    "Linear",
    "LayerNorm",
    "RMSNorm",
    "rope_tables",
    "apply_rope",
    "attention",
    "attention_heads",
    "remat",
    "stacked",
    "run_layers",
    "make_param",
    "constrain",
    "NEG_INF",
]
