"""LLaMA-2 / Vicuna decoder (HF `LlamaForCausalLM` numerics) with a static-shape KV cache.

Padding: `attention_mask` [B, T] (1 = real token) masks keys; default positions are
cumsum(mask) - 1 clipped at 0, so left- and right-padded rows get the positions of unpadded ones.

KV cache (`KVCache`): keys/values for every layer in slots [0, max_len). A call with a cache writes its
T tokens at slots [index, index + T) (a prefill from an empty cache writes [0, T); later one-token steps
write at the current index), records which slots hold real tokens (`valid`), and continues each row's
positions from `next_pos`. Queries attend to valid slots at or before their own slot. Cached calls
always use the XLA attention path (attention_impl 'cudnn'/'splash' apply to full-sequence forwards).
Writing past max_len is not checked under jit (dynamic_update_slice would clamp): size the cache for
prompt + new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from rskd_jax.models.layers import (
    Linear,
    RMSNorm,
    apply_rope,
    attention_heads,
    constrain,
    make_param,
    normal,
    rope_tables,
    run_layers,
    stacked,
)
from rskd_jax.models.presets import TextConfig
from rskd_jax.parallel.rules import logical_to_spec


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, Dh] (head-major: the attention's layout)
    v: jax.Array  # [L, B, K, S, Dh]
    valid: jax.Array  # [B, S] bool: slot holds a real (unpadded) token
    index: jax.Array  # int32 scalar: next slot to write
    next_pos: jax.Array  # [B] int32: position id of each row's next real token

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, m, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, m, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, m, ("embed", "mlp"), **kw)
        self.down_proj = Linear(m, d, ("mlp", "embed"), **kw)
        self.cfg, self.attention_impl = cfg, attention_impl

    def __call__(self, h, rope_cs, mask, kv=None, rng=None, custom_mask: bool = False):
        """h [B,T,D]; rope_cs = (cos, sin) [B,1,T,Dh] (layers.rope_tables); mask [B,T,S] bool;
        kv = (k_all, v_all, layer, slot): write/read the stacked cache.
        custom_mask: `mask` is not key-padding & causal (packed views)."""
        cfg = self.cfg
        rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        x = self.input_norm(h)
        # Head-major [B, H, T, Dh] throughout: the projections write it, the KV cache stores it and the
        # attention dots read it without transposes.
        heads = lambda lin, n, r: constrain(lin.split_heads(x, n, r), ("batch", "heads", "seq", "head_dim"))
        q = apply_rope(heads(self.q_proj, cfg.num_heads, rngs[0]), *rope_cs)
        k = apply_rope(heads(self.k_proj, cfg.num_kv_heads, rngs[1]), *rope_cs)
        v = heads(self.v_proj, cfg.num_kv_heads, rngs[2])
        if kv is not None:
            k_all, v_all, i, slot = kv
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (i, 0, 0, slot, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (i, 0, 0, slot, 0))
            k = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False).astype(q.dtype)
            kv = (k_all, v_all)
        # Calls with a KV cache (rollout prefill/decode) always use the XLA path; so do custom masks (packed
        # views) under 'splash', whose kernel is built for causal + key padding only.
        cached_or_custom_splash = kv is not None or (custom_mask and self.attention_impl.startswith("splash"))
        impl = "xla" if cached_or_custom_splash else self.attention_impl
        o = attention_heads(q, k, v, mask, impl)
        h = h + checkpoint_name(self.o_proj.merge_heads(o, rngs[3]), "attn_out")
        x = self.post_norm(h)
        x = constrain(
            jax.nn.silu(self.gate_proj(x, rngs[4])) * self.up_proj(x, rngs[5]), ("batch", "seq", "mlp")
        )
        h = h + checkpoint_name(self.down_proj(x, rngs[6]), "mlp_out")
        return constrain(h, ("batch", "seq", "embed")), kv


class LlamaModel(nnx.Module):
    """Token embedding, decoder layers, final RMSNorm and the untied lm_head."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan: bool = True,
        remat: str = "none",
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.embed_tokens = make_param(
            rngs, normal, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype
        )
        make = lambda r: LlamaLayer(
            cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=r
        )
        self.layers = (
            stacked(make, cfg.num_layers, rngs)
            if scan
            else nnx.List([make(rngs) for _ in range(cfg.num_layers)])
        )
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.lm_head = Linear(
            cfg.hidden_size,
            cfg.vocab_size,
            ("embed", "vocab"),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.cfg, self.dtype, self.scan, self.remat = cfg, dtype, scan, remat

    def embed(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """lm_head in the compute dtype; float32 result."""
        return self.lm_head(hidden).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = self.dtype if dtype is None else dtype
        return KVCache(
            k=constrain(jnp.zeros(shape, dtype), CACHE_AXES),
            v=constrain(jnp.zeros(shape, dtype), CACHE_AXES),
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch_size,), jnp.int32),
        )

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: Sequence[int] = (),
        *,
        dropout_rng: jax.Array | None = None,
        attn_mask: jax.Array | None = None,
    ):
        """-> (last_hidden [B,T,D] after the final norm, {index: hidden}, updated cache or None).

        return_hidden: HF hidden-state indices (0 = embeddings, i = after layer i, num_layers = after the
        final norm); negative indices count from num_layers + 1. Only those are collected (also under scan).
        attn_mask: bool [B, T, T] (True = query t attends key s) replacing key-padding & causal, e.g. to pack
        two continuations of one prompt into one sequence; needs explicit `positions`. With a cache it is
        [B, T, max_len] over the cache slots (the T tokens are written at [index, index + T) first), e.g. to
        run new tokens against a cached prefix with a mask of their own.
        """
        cfg = self.cfg
        n = cfg.num_layers
        b, t, _ = inputs_embeds.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        custom = attn_mask is not None
        positions, attn_mask, key_valid = _positions_and_mask(mask, positions, cache, attn_mask)

        wanted = sorted({_norm_index(i, n) for i in return_hidden})
        mid = [i for i in wanted if 0 < i < n]
        slot_of = jnp.array([mid.index(i + 1) if i + 1 in mid else -1 for i in range(n)], jnp.int32)
        h = inputs_embeds.astype(self.dtype)
        rope_cs = rope_tables(positions, cfg.head_dim, cfg.rope_theta, self.dtype, heads_first=True)
        buf = jnp.zeros((len(mid),) + h.shape, h.dtype) if mid else None
        kv = None if cache is None else (cache.k, cache.v)

        def body(layer, carry, x):
            h, buf, kv = carry
            i, slot = x
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            h, kv = layer(h, rope_cs, attn_mask, None if kv is None else (*kv, i, cache.index), rng, custom)
            if buf is not None:
                s = jnp.maximum(slot, 0)
                buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, h, buf[s]), s, 0)
            return h, buf, kv

        h, buf, kv = run_layers(
            self.layers, body, (h, buf, kv), (jnp.arange(n), slot_of), scan=self.scan, policy=self.remat
        )
        last = self.norm(h)
        hidden = {
            i: (inputs_embeds.astype(self.dtype) if i == 0 else last if i == n else buf[mid.index(i)])
            for i in wanted
        }
        hidden = {i: hidden[_norm_index(i, n)] for i in return_hidden}
        if cache is not None:
            cache = KVCache(
                k=kv[0],
                v=kv[1],
                valid=key_valid,
                index=cache.index + t,
                next_pos=cache.next_pos + mask.sum(1, dtype=jnp.int32),
            )
        return last, hidden, cache


def cache_shardings(cache: KVCache, mesh) -> KVCache:
    """NamedShardings for a KV cache per the rules table (e.g. for jit in/out_shardings in a rollout)."""
    named = lambda x, names: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh))
    return KVCache(
        k=named(cache.k, CACHE_AXES),
        v=named(cache.v, CACHE_AXES),
        valid=named(cache.valid, ("batch", "cache_seq")),
        index=NamedSharding(mesh, PartitionSpec()),
        next_pos=named(cache.next_pos, ("batch",)),
    )


def _positions_and_mask(mask, positions, cache: KVCache | None, attn_mask):
    """(positions [B, T], attention mask [B, T, keys], the cache's key validity after this call (None
    without a cache)) of `LlamaModel.__call__`: key padding & causal unless `attn_mask` is given."""
    b, t = mask.shape
    offset = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_pos
    custom = attn_mask is not None
    if custom and positions is None:
        raise ValueError("attn_mask needs explicit positions")
    if positions is None:
        positions = offset[:, None] + jnp.maximum(jnp.cumsum(mask, 1, dtype=jnp.int32) - 1, 0)
    key_valid = None
    if cache is not None:
        key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    if custom:
        keys = t if cache is None else cache.max_len
        if attn_mask.shape != (b, t, keys):
            raise ValueError(f"attn_mask shape {attn_mask.shape}; expected {(b, t, keys)}")
        attn_mask = attn_mask.astype(bool)
    elif cache is None:
        attn_mask = mask[:, None, :] & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]
    else:
        q_slot = cache.index + jnp.arange(t)
        causal = jnp.arange(key_valid.shape[1])[None, :] <= q_slot[:, None]
        attn_mask = key_valid[:, None, :] & causal[None]
    return positions, attn_mask, key_valid


def _norm_index(i: int, n: int) -> int:
    if not -(n + 1) <= i <= n:
        raise ValueError(f"hidden-state index {i} outside [-{n + 1}, {n}] for a {n}-layer decoder")
    return i % (n + 1)
