"""Model configs (frozen dataclasses) and named presets (parameter counts: counts.py).

A preset name plus a checkpoint path is all a run config needs to name a model. Sizes come from
../shared/reference/geochat.md (CLIP-ViT-L/14, Vicuna-7B/13B v1.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SELECT_STRATEGIES = ("patch", "full")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "splash_interpret")  # splash_interpret: tests, debugging
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
    "save_attn_mlp_out",
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (HF `CLIPVisionConfig` fields under shorter names)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-2 / Vicuna decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """CLIP tower + projector + LLaMA decoder, plus the knobs that pick layouts and numerics.

    `select_strategy`: 'patch' drops the CLS token (HF 'default', GeoChat 'patch'), 'full' keeps it.
    `scan_layers`: stacked weights with a leading `layers` axis run by `lax.scan` (else an nnx.List).
    `remat_policy`: one of REMAT_POLICIES, applied per layer. `dtype`: compute dtype; `param_dtype`: storage.
    """

    vision: VisionConfig
    text: TextConfig
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    select_strategy: str = "patch"
    image_token_id: int = 32000
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"

    def __post_init__(self):
        checks = [
            ("select_strategy", SELECT_STRATEGIES),
            ("projector_type", PROJECTOR_TYPES),
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
        ]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"LlavaConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"LlavaConfig.{name}={getattr(self, name)!r} is not a dtype name") from e
        n = self.vision.num_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer={self.vision_feature_layer} outside [-{n + 1}, {n}]")

    @property
    def image_seq_length(self) -> int:
        return self.vision.num_patches + (1 if self.select_strategy == "full" else 0)

    def replace(self, **kw) -> LlavaConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, patch_size=14)
VICUNA_7B = TextConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
)
VICUNA_13B = TextConfig(
    vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
)

_PRESETS = {
    # Test size: 3+3 layers, GQA (4 heads / 2 KV heads), 32px images of 8px patches -> 16 image tokens.
    "tiny": lambda: LlavaConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=32, patch_size=8
        ),
        text=TextConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=256,
        ),
        image_token_id=127,
    ),
    # GeoChat-7B: CLIP-L/14 at 504 px (1297-row interpolated position table, 1296 image tokens) + Vicuna-7B.
    # image_token_id 32000 is outside the 32000-row vocabulary: it is a placeholder, never embedded.
    "geochat_7b": lambda: LlavaConfig(vision=VisionConfig(image_size=504, **CLIP_L14), text=VICUNA_7B),
    "geochat_13b": lambda: LlavaConfig(vision=VisionConfig(image_size=504, **CLIP_L14), text=VICUNA_13B),
    # LLaVA-1.5-7B (original liuhaotian layout, 32000 vocab): CLIP-L/14 at 336 px (577 positions).
    "llava15_7b": lambda: LlavaConfig(vision=VisionConfig(image_size=336, **CLIP_L14), text=VICUNA_7B),
}


def get_preset(name: str, **overrides) -> LlavaConfig:
    """A named config; `overrides` replace top-level LlavaConfig fields (e.g. scan_layers=False)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(_PRESETS)}")
    return _PRESETS[name]().replace(**overrides)
