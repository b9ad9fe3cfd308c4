"""HF (PyTorch) state dict <-> our nnx parameter tree: one key table + invertible transforms.

Each table row is (HF key suffix, our path, transform). Transforms: 'linear' (torch [out, in] -> kernel
[in, out]), 'conv' (torch [out, in, kh, kw] -> [kh, kw, in, out]), None (copy). Per-layer rows are stacked
on a leading axis for the scanned layout, or keyed by layer number for the unscanned one. `to_hf_state_dict`
runs the same table backwards (export). Input keys may use the transformers 5.x in-memory layout
(`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`) or the
on-disk layouts of 4.x/5.x llava-hf checkpoints (normalised by `normalize_llava_keys`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.models.clip_vit import interpolate_pos_table
from rskd_jax.models.presets import LlavaConfig, TextConfig, VisionConfig

CLIP_TOP = [
    ("embeddings.class_embedding", "class_embed", None),
    ("embeddings.patch_embedding.weight", "patch_embed", "conv"),
    ("embeddings.position_embedding.weight", "pos_embed", None),
    ("pre_layrnorm.weight", "pre_ln.scale", None),
    ("pre_layrnorm.bias", "pre_ln.bias", None),
    ("post_layernorm.weight", "post_ln.scale", None),
    ("post_layernorm.bias", "post_ln.bias", None),
]
CLIP_LAYER_PREFIX = "encoder.layers.{i}."
CLIP_LAYER = [
    *[
        (f"self_attn.{n}_proj.{w}", f"{n}_proj.{o}", t)
        for n in ("q", "k", "v", "out")
        for w, o, t in (("weight", "kernel", "linear"), ("bias", "bias", None))
    ],
    ("layer_norm1.weight", "ln1.scale", None),
    ("layer_norm1.bias", "ln1.bias", None),
    ("layer_norm2.weight", "ln2.scale", None),
    ("layer_norm2.bias", "ln2.bias", None),
    ("mlp.fc1.weight", "fc1.kernel", "linear"),
    ("mlp.fc1.bias", "fc1.bias", None),
    ("mlp.fc2.weight", "fc2.kernel", "linear"),
    ("mlp.fc2.bias", "fc2.bias", None),
]
LLAMA_TOP = [("embed_tokens.weight", "embed_tokens", None), ("norm.weight", "norm.scale", None)]
LLAMA_LAYER_PREFIX = "layers.{i}."
LLAMA_LAYER = [
    *[(f"self_attn.{n}_proj.weight", f"{n}_proj.kernel", "linear") for n in "qkvo"],
    *[(f"mlp.{n}_proj.weight", f"{n}_proj.kernel", "linear") for n in ("gate", "up", "down")],
    ("input_layernorm.weight", "input_norm.scale", None),
    ("post_attention_layernorm.weight", "post_norm.scale", None),
]
PROJECTOR = [
    (f"linear_{j}.{w}", f"linear_{j}.{o}", t)
    for j in (1, 2)
    for w, o, t in (("weight", "kernel", "linear"), ("bias", "bias", None))
]

# Prefixes of the 5.x in-memory LlavaForConditionalGeneration layout.
VISION_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX, LM_HEAD_KEY = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.language_model.",
    "lm_head.weight",
)
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|position_ids)$")

_FORWARD = {None: lambda w: w, "linear": lambda w: w.T, "conv": lambda w: w.transpose(2, 3, 1, 0)}
_BACKWARD = {None: lambda w: w, "linear": lambda w: w.T, "conv": lambda w: w.transpose(3, 2, 0, 1)}


def normalize_llava_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Maps 4.x llava-hf / 5.x on-disk key layouts onto the 5.x in-memory layout."""
    rules = [
        (r"^language_model\.model\.", LLM_PREFIX),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^vision_tower\.vision_model\.", VISION_PREFIX),
        (r"^model\.vision_tower\.vision_model\.", VISION_PREFIX),
        (r"^vision_tower\.", VISION_PREFIX),
        (r"^multi_modal_projector\.", PROJECTOR_PREFIX),
    ]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("."):
        tree = tree[p]
    return tree


def _take(sd: dict, key: str, used: set, where: str) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"{where}: missing key {key!r} in the HF state dict")
    used.add(key)
    return np.asarray(sd[key])


def _convert(sd, prefix, top, layer_prefix, layer_rows, num_layers, scan, used, where) -> dict:
    tree: dict = {}
    for hf, ours, tf in top:
        _set(tree, ours, _FORWARD[tf](_take(sd, prefix + hf, used, where)))
    for hf, ours, tf in layer_rows:
        per = [
            _FORWARD[tf](_take(sd, prefix + layer_prefix.format(i=i) + hf, used, where))
            for i in range(num_layers)
        ]
        if scan:
            _set(tree, "layers." + ours, np.stack(per))
        else:
            for i, w in enumerate(per):
                tree.setdefault("layers", {}).setdefault(i, {})
                _set(tree["layers"][i], ours, w)
    return tree


def clip_params_from_hf_state_dict(
    cfg: VisionConfig,
    sd: dict[str, np.ndarray],
    *,
    scan: bool = True,
    prefix: str = "",
    _used: set | None = None,
) -> dict:
    """CLIPVisionModel (5.x: `embeddings.*`, `encoder.layers.*`, ...) -> ClipVisionModel pure dict.

    A position table whose row count differs from cfg.num_positions is resized with GeoChat's recipe
    (interpolate_pos_table): e.g. a 577-row CLIP-336 table for the 504 px GeoChat tower.
    """
    used = set() if _used is None else _used
    tree = _convert(sd, prefix, CLIP_TOP, CLIP_LAYER_PREFIX, CLIP_LAYER, cfg.num_layers, scan, used, "CLIP")
    if tree["pos_embed"].shape[0] != cfg.num_positions:
        tree["pos_embed"] = interpolate_pos_table(tree["pos_embed"], cfg.grid)
    return tree


def llama_params_from_hf_state_dict(
    cfg: TextConfig,
    sd: dict[str, np.ndarray],
    *,
    scan: bool = True,
    prefix: str = "model.",
    lm_head_key: str = "lm_head.weight",
    _used: set | None = None,
) -> dict:
    """LlamaForCausalLM (`model.*`, `lm_head.weight`) -> LlamaModel pure dict."""
    used = set() if _used is None else _used
    tree = _convert(
        sd, prefix, LLAMA_TOP, LLAMA_LAYER_PREFIX, LLAMA_LAYER, cfg.num_layers, scan, used, "LLaMA"
    )
    tree["lm_head"] = {"kernel": _take(sd, lm_head_key, used, "LLaMA").T}
    return tree


def llava_params_from_hf_state_dict(
    cfg: LlavaConfig, state_dict: dict[str, np.ndarray], *, strict: bool = True
) -> dict:
    """LlavaForConditionalGeneration state dict -> LlavaModel pure dict (layout per cfg.scan_layers).

    strict: unexpected keys (other than rotary inv_freq / position_ids buffers) raise.
    """
    sd = normalize_llava_keys(state_dict)
    used: set = set()
    tree = {
        "vision": clip_params_from_hf_state_dict(
            cfg.vision, sd, scan=cfg.scan_layers, prefix=VISION_PREFIX, _used=used
        ),
        "projector": {},
        "llm": llama_params_from_hf_state_dict(
            cfg.text, sd, scan=cfg.scan_layers, prefix=LLM_PREFIX, lm_head_key=LM_HEAD_KEY, _used=used
        ),
    }
    rows = PROJECTOR if cfg.projector_type == "mlp2x_gelu" else PROJECTOR[:2]
    for hf, ours, tf in rows:
        _set(tree["projector"], ours, _FORWARD[tf](_take(sd, PROJECTOR_PREFIX + hf, used, "projector")))
    extra = sorted(k for k in sd if k not in used and not IGNORED.match(k))
    # HF's vision tower has no use for layers above vision_feature_layer, but it does store them; all used.
    if strict and extra:
        raise ValueError(
            f"unexpected keys in the HF Llava state dict (not in the key map): {extra[:10]}"
            f"{' ...' if len(extra) > 10 else ''}"
        )
    return tree


def to_hf_state_dict(cfg: LlavaConfig, tree: dict) -> dict[str, np.ndarray]:
    """Inverse of llava_params_from_hf_state_dict (5.x in-memory key layout); float arrays as stored."""
    out: dict[str, np.ndarray] = {}

    def emit(sub, prefix, top, layer_prefix, layer_rows, n):
        for hf, ours, tf in top:
            out[prefix + hf] = _BACKWARD[tf](np.asarray(_get(sub, ours)))
        for hf, ours, tf in layer_rows:
            for i in range(n):
                w = _get(sub["layers"], ours)[i] if cfg.scan_layers else _get(sub["layers"][i], ours)
                out[prefix + layer_prefix.format(i=i) + hf] = _BACKWARD[tf](np.asarray(w))

    emit(tree["vision"], VISION_PREFIX, CLIP_TOP, CLIP_LAYER_PREFIX, CLIP_LAYER, cfg.vision.num_layers)
    emit(tree["llm"], LLM_PREFIX, LLAMA_TOP, LLAMA_LAYER_PREFIX, LLAMA_LAYER, cfg.text.num_layers)
    rows = PROJECTOR if cfg.projector_type == "mlp2x_gelu" else PROJECTOR[:2]
    emit(tree["projector"], PROJECTOR_PREFIX, rows, "", [], 0)
    out[LM_HEAD_KEY] = np.asarray(tree["llm"]["lm_head"]["kernel"]).T
    return out


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
    v, t = hf_config.vision_config, hf_config.text_config
    vision = VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
    )
    text = text_config_from_hf(t)
    strategy = {"default": "patch", "full": "full"}[hf_config.vision_feature_select_strategy]
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single int layer is supported")
    if getattr(hf_config, "projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act={hf_config.projector_hidden_act!r}; only 'gelu' (mlp2x_gelu)")
    tok = lambda name, default: default if getattr(t, name, None) is None else getattr(t, name)
    return LlavaConfig(
        vision=vision,
        text=text,
        projector_type="mlp2x_gelu",
        vision_feature_layer=layer,
        select_strategy=strategy,
        image_token_id=hf_config.image_token_id,
        pad_token_id=tok("pad_token_id", 0),
        bos_token_id=tok("bos_token_id", 1),
        eos_token_id=tok("eos_token_id", 2),
    ).replace(**overrides)


def text_config_from_hf(t) -> TextConfig:
    rope = getattr(t, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r}: only default RoPE is implemented")
    return TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=float(theta),
        max_position_embeddings=t.max_position_embeddings,
    )


def hf_llava_config(cfg: LlavaConfig):
    """Our LlavaConfig -> a transformers LlavaConfig (for export, and to build reference models in tests)."""
    import transformers

    v, t = cfg.vision, cfg.text
    vc = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
    )
    tc = transformers.LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=False,
    )
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError("transformers' Llava has only the 2-layer GELU projector")
    return transformers.LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=cfg.image_token_id,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy={"patch": "default", "full": "full"}[cfg.select_strategy],
        image_seq_length=cfg.image_seq_length,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
