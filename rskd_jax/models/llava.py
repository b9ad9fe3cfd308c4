"""LLaVA / GeoChat multimodal model: CLIP tower -> projector -> image tokens spliced into the LLaMA input.

`input_ids` carry `image_token_id` repeated `image_seq_length` times per image (transformers' convention);
the k-th image token of row b receives feature k of image b (HF's masked_scatter for one image per row).
Rows without image tokens are plain text. `pixel_values` are NHWC, already CLIP-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.models.clip_vit import ClipVisionModel
from rskd_jax.models.llama import KVCache, LlamaModel
from rskd_jax.models.presets import LlavaConfig
from rskd_jax.models.projector import Projector


@flax.struct.dataclass
class LlavaOutput:
    logits: jax.Array | None  # [B, T, V] or [B, K, V] at `logits_at`; float32; None if compute_logits=False
    last_hidden: jax.Array  # [B, T, D] after the final norm
    hidden_states: dict  # {requested index: [B, T, D]}
    image_features: jax.Array | None  # [B, N, D] projected image tokens
    cache: KVCache | None


class LlavaModel(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            scan=cfg.scan_layers,
            remat=cfg.remat_policy,
            attention_impl=cfg.attention_impl,
            rngs=rngs,
        )
        self.vision = ClipVisionModel(cfg.vision, **kw)
        self.projector = Projector(
            cfg.projector_type,
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            dtype=kw["dtype"],
            param_dtype=kw["param_dtype"],
            rngs=rngs,
        )
        self.llm = LlamaModel(cfg.text, **kw)
        self.cfg = cfg

    def vision_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, N, Dv]: CLIP hidden_states[vision_feature_layer], CLS dropped for 'patch'; pre-projector."""
        h = self.vision.hidden_state(pixel_values, self.cfg.vision_feature_layer)
        return h[:, 1:] if self.cfg.select_strategy == "patch" else h

    def image_features(
        self, pixel_values: jax.Array | None = None, *, vision_features: jax.Array | None = None
    ) -> jax.Array:
        """[B, N, D]: projected image tokens (from pixels, or from precomputed `vision_features`)."""
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("image_features needs pixel_values or vision_features")
            vision_features = self.vision_features(pixel_values)
        return self.projector(vision_features)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        return self.llm.init_cache(batch_size, max_len, dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        vision_features: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        return_hidden: Sequence[int] = (),
        compute_logits: bool = True,
        dropout_rng: jax.Array | None = None,
        attn_mask: jax.Array | None = None,
    ) -> LlavaOutput:
        """See the module docstring and LlamaModel.__call__ (mask, positions, cache, return_hidden, attn_mask).

        logits_at: int [B, K] positions -> logits [B, K, V] there only. dropout_rng: enables LoRA dropout.
        """
        cfg = self.cfg
        is_img = input_ids == cfg.image_token_id
        emb = self.llm.embed(jnp.where(is_img, 0, input_ids))
        feats = None
        has_image = pixel_values is not None or vision_features is not None
        n_img = (
            (vision_features.shape[1] if vision_features is not None else cfg.image_seq_length)
            if has_image
            else 0
        )
        _check_image_tokens(input_ids, is_img, n_img)
        if has_image:
            feats = self.image_features(pixel_values, vision_features=vision_features)
            idx = jnp.clip(jnp.cumsum(is_img, 1) - 1, 0, feats.shape[1] - 1)
            spliced = jnp.take_along_axis(feats, idx[..., None], axis=1).astype(emb.dtype)
            emb = jnp.where(is_img[..., None], spliced, emb)
        last, hidden, cache = self.llm(
            emb, attention_mask, positions, cache, return_hidden, dropout_rng=dropout_rng, attn_mask=attn_mask
        )
        logits = None
        if compute_logits:
            sel = last if logits_at is None else jnp.take_along_axis(last, logits_at[..., None], axis=1)
            logits = self.logits(sel)
        return LlavaOutput(
            logits=logits, last_hidden=last, hidden_states=hidden, image_features=feats, cache=cache
        )


def _check_image_tokens(input_ids, is_img, n: int):
    """Eager-mode check (skipped under jit): each row has 0 or exactly n image tokens."""
    if isinstance(is_img, jax.core.Tracer):
        return
    counts = np.asarray(is_img).sum(1)
    bad = [(b, int(c)) for b, c in enumerate(counts) if c not in (0, n)]
    if bad:
        raise ValueError(
            f"rows (row, image-token count) {bad}: each row needs 0 or {n} image tokens "
            f"(image_seq_length) when {'features are' if n else 'no image is'} given"
        )
