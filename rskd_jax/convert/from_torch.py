"""HF (PyTorch) models <-> our nnx models, in memory: a thin layer over the conversion package.

The key table, transforms and config mapping live in keymap.py, statedict.py and hfconfig.py; the names here
are the ones the model tests, benchmarks and notebooks use. Input keys may use the transformers 5.x in-memory
layout (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`) or
the on-disk layouts of 4.x/5.x llava-hf checkpoints.
Missing keys raise a KeyError (convert.errors.MissingKeysError), other mismatches a ValueError.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.convert import hfconfig, keymap, statedict
from rskd_jax.models.presets import LlavaConfig, TextConfig, VisionConfig

__all__ = [
    "normalize_llava_keys",
    "clip_params_from_hf_state_dict",
    "llama_params_from_hf_state_dict",
    "llava_params_from_hf_state_dict",
    "to_hf_state_dict",
    "load_params",
    "config_from_hf",
    "text_config_from_hf",
    "hf_llava_config",
]


def normalize_llava_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Maps 4.x llava-hf / 5.x on-disk key layouts onto the 5.x in-memory layout (other keys kept as is)."""
    return {keymap.canonical_key(k, "hf-llava") or k: v for k, v in sd.items()}


def clip_params_from_hf_state_dict(
    cfg: VisionConfig, sd: dict[str, np.ndarray], *, scan: bool = True, prefix: str = ""
) -> dict:
    """CLIPVisionModel (5.x: `embeddings.*`, `encoder.layers.*`, ...) -> ClipVisionModel pure dict.

    Keys outside the table are ignored. A position table whose row count differs from cfg.num_positions is
    resized with GeoChat's recipe (interpolate_pos_table): e.g. a 577-row CLIP-336 table for the 504 px tower.
    """
    sd = _rekey(sd, prefix, "")
    return statedict.vision_params_from_state_dict(cfg, sd, scan=scan, strict=False)


def llama_params_from_hf_state_dict(
    cfg: TextConfig,
    sd: dict[str, np.ndarray],
    *,
    scan: bool = True,
    prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
) -> dict:
    """LlamaForCausalLM (`model.*`, `lm_head.weight`) -> LlamaModel pure dict; keys outside it are ignored."""
    sd = _rekey(_rekey(sd, prefix, "model."), lm_head_key, "lm_head.weight")
    return statedict.text_params_from_state_dict(cfg, sd, scan=scan, strict=False)


def llava_params_from_hf_state_dict(
    cfg: LlavaConfig, state_dict: dict[str, np.ndarray], *, strict: bool = True
) -> dict:
    """LlavaForConditionalGeneration state dict -> LlavaModel pure dict (layout per cfg.scan_layers).

    strict: unexpected keys (other than rotary inv_freq / position_ids buffers) raise.
    """
    return statedict.params_from_state_dict(cfg, state_dict, strict=strict)


def to_hf_state_dict(cfg: LlavaConfig, tree: dict) -> dict[str, np.ndarray]:
    """Inverse of llava_params_from_hf_state_dict (5.x in-memory key layout); float arrays as stored."""
    return statedict.state_dict_from_params(cfg, tree)


def _rekey(sd: dict, old: str, new: str) -> dict:
    if old == new:
        return sd
    return {new + k[len(old) :] if k.startswith(old) else k: v for k, v in sd.items()}


def load_params(model: nnx.Module, tree: dict) -> nnx.Module:
    """Writes a pure-dict parameter tree into `model` (concrete, sharded, or abstract from nnx.eval_shape).

    Every base nnx.Param (LoRA params excluded) must be present with the same shape; values are cast to the
    param's dtype and placed with its current sharding (if any). Returns the model (updated in place).
    """
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    flat_model = dict(nnx.to_flat_state(state))
    flat_tree = _flatten(tree)
    missing = sorted(".".join(map(str, k)) for k in flat_model if k not in flat_tree)
    extra = sorted(".".join(map(str, k)) for k in flat_tree if k not in flat_model)
    if missing or extra:
        raise ValueError(
            f"parameter tree does not match the model: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    for k, var in flat_model.items():
        w = flat_tree[k]
        if tuple(w.shape) != tuple(var.shape):
            raise ValueError(
                f"parameter {'.'.join(map(str, k))}: model expects shape {tuple(var.shape)}, "
                f"got {tuple(w.shape)}"
            )
        raw = var.get_value() if hasattr(var, "get_value") else var[...]
        sharding = getattr(raw, "sharding", None)
        arr = np.asarray(w).astype(raw.dtype) if raw.dtype != jnp.bfloat16 else jnp.asarray(w, raw.dtype)
        var.set_value(
            jax.device_put(arr, sharding) if isinstance(sharding, jax.sharding.Sharding) else jnp.asarray(arr)
        )
    nnx.update(model, state)
    return model


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def config_from_hf(hf_config, **overrides) -> LlavaConfig:
    """transformers LlavaConfig -> our LlavaConfig (layout/dtype knobs from `overrides`)."""
    return hfconfig.llava_config(_as_dict(hf_config), "transformers LlavaConfig").replace(**overrides)


def text_config_from_hf(t) -> TextConfig:
    """transformers LlamaConfig -> our TextConfig."""
    return hfconfig.text_config(_as_dict(t), "transformers LlamaConfig")


def hf_llava_config(cfg: LlavaConfig):
    """Our LlavaConfig -> a transformers LlavaConfig (for export, and to build reference models in tests).

    Built from the exported config.json (hfconfig.hf_llava_dict) less its file metadata and the fields that
    transformers' own LlavaConfig would not set (a top-level pad id, CLIP's unused projection_dim).
    """
    import transformers  # noqa: PLC0415  (optional: only tests and export use it)

    d = hfconfig.hf_llava_dict(cfg, cfg.text.vocab_size, "float32")
    for part in (d, d["text_config"]):
        for k in ("architectures", "dtype", "torch_dtype"):
            part.pop(k)
    d.pop("pad_token_id")
    d["vision_config"].pop("projection_dim")
    return transformers.LlavaConfig(**d)


def _as_dict(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)
