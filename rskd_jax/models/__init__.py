"""Flax NNX ports of CLIP-ViT, the LLaVA projector, LLaMA and the LLaVA/GeoChat model."""

from rskd_jax.models.clip_vit import ClipOutput, ClipVisionModel, interpolate_pos_table
from rskd_jax.models.counts import param_counts
from rskd_jax.models.cpu_compile import compiler_options
from rskd_jax.models.llama import KVCache, LlamaModel, cache_shardings
from rskd_jax.models.llava import LlavaModel, LlavaOutput
from rskd_jax.models.lora import LoRAConfig, LoRAParam, apply_lora, merge_lora, without_lora
from rskd_jax.models.presets import LlavaConfig, TextConfig, VisionConfig, get_preset
from rskd_jax.models.projector import Projector

__all__ = [
    "ClipOutput",
    "ClipVisionModel",
    "interpolate_pos_table",
    "compiler_options",
    "KVCache",
    "LlamaModel",
    "cache_shardings",
    "LlavaModel",
    "LlavaOutput",
    "LoRAConfig",
    "LoRAParam",
    "apply_lora",
    "merge_lora",
    "without_lora",
    "LlavaConfig",
    "TextConfig",
    "VisionConfig",
    "get_preset",
    "param_counts",
    "Projector",
]
