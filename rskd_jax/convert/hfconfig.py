"""config.json files (HF Llava / CLIP / LLaMA, original LLaVA / GeoChat) <-> our LlavaConfig, read without
transformers.

The converter reads configs as plain JSON so that converting a safetensors checkpoint never imports torch
(it would cost ~240 MB of host memory). Fields missing from a file take transformers 5.24's defaults (the
tables below, checked against transformers itself in tests/test_convert_config.py); features our model does
not implement (biased LLaMA projections, RoPE scaling, tied embeddings, non-GELU projectors) are errors.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

from rskd_jax.convert.errors import ConversionError
from rskd_jax.models.presets import LlavaConfig, TextConfig, VisionConfig

# transformers 5.24 defaults.
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# LlavaConfig's vision tower when config.json has no vision_config (CLIP-L/14-336).
LLAVA_VISION_DEFAULTS = dict(
    CLIP_VISION_DEFAULTS,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)
LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    hidden_act="silu",
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    head_dim=None,
)
LLAVA_DEFAULTS = dict(
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    multimodal_projector_bias=True,
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path}: missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from e


def _get(d: dict, defaults: dict, name: str):
    v = d.get(name)
    return defaults[name] if v is None else v


def vision_config(d: dict, where: str, defaults: dict = CLIP_VISION_DEFAULTS) -> VisionConfig:
    """A CLIPVisionConfig dict (or a CLIPConfig dict with `vision_config`) -> VisionConfig."""
    if d.get("model_type") == "clip" or ("vision_config" in d and "hidden_size" not in d):
        d = d.get("vision_config") or {}
    g = lambda n: _get(d, defaults, n)
    if g("hidden_act") not in ("quick_gelu", "gelu"):
        raise ConversionError(f"{where}: vision hidden_act={g('hidden_act')!r}; supported: quick_gelu, gelu")
    return VisionConfig(
        hidden_size=g("hidden_size"),
        intermediate_size=g("intermediate_size"),
        num_layers=g("num_hidden_layers"),
        num_heads=g("num_attention_heads"),
        image_size=g("image_size"),
        patch_size=g("patch_size"),
        num_channels=g("num_channels"),
        layer_norm_eps=float(g("layer_norm_eps")),
        hidden_act=g("hidden_act"),
    )


def text_config(d: dict, where: str) -> TextConfig:
    """A LlamaConfig dict (5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`) -> TextConfig."""
    g = lambda n: _get(d, LLAMA_DEFAULTS, n)
    heads = g("num_attention_heads")
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    problems = []
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        problems.append(
            f"RoPE scaling {rope.get('rope_type') or d.get('rope_scaling')!r} (only default RoPE)"
        )
    if g("hidden_act") != "silu":
        problems.append(f"hidden_act={g('hidden_act')!r} (only silu)")
    if g("attention_bias") or g("mlp_bias"):
        problems.append("attention_bias / mlp_bias (our LLaMA has bias-free projections)")
    if g("tie_word_embeddings"):
        problems.append("tie_word_embeddings=True (our model has a separate lm_head)")
    if d.get("head_dim") not in (None, g("hidden_size") // heads):
        problems.append(f"head_dim={d['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise ConversionError(f"{where}: unsupported LLaMA config: " + "; ".join(problems))
    return TextConfig(
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        intermediate_size=g("intermediate_size"),
        num_layers=g("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        rms_norm_eps=float(g("rms_norm_eps")),
        rope_theta=float(theta),
        max_position_embeddings=g("max_position_embeddings"),
    )


def _special_ids(t: dict, top: dict) -> dict:
    pick = lambda n, default: next((x for x in (t.get(n), top.get(n)) if isinstance(x, int)), default)
    return dict(
        pad_token_id=pick("pad_token_id", 0),
        bos_token_id=pick("bos_token_id", 1),
        eos_token_id=pick("eos_token_id", 2),
    )


def llava_config(d: dict, where: str) -> LlavaConfig:
    """An HF LlavaConfig dict (config.json of a LlavaForConditionalGeneration directory) -> LlavaConfig."""
    g = lambda n: _get(d, LLAVA_DEFAULTS, n)
    vis = d.get("vision_config")
    vision = vision_config(vis, where) if vis is not None else vision_config({}, where, LLAVA_VISION_DEFAULTS)
    t = d.get("text_config") or {}
    layer, strategy = g("vision_feature_layer"), g("vision_feature_select_strategy")
    if not isinstance(layer, int):
        raise ConversionError(
            f"{where}: vision_feature_layer={layer!r}; only a single int layer is supported"
        )
    if strategy not in ("default", "full"):
        raise ConversionError(f"{where}: vision_feature_select_strategy={strategy!r}; expected default/full")
    if g("projector_hidden_act") != "gelu" or not g("multimodal_projector_bias"):
        raise ConversionError(
            f"{where}: only the biased Linear-GELU-Linear projector (mlp2x_gelu) is supported"
        )
    token = d.get("image_token_index", d.get("image_token_id"))
    return LlavaConfig(
        vision=vision,
        text=text_config(t, where),
        projector_type="mlp2x_gelu",
        vision_feature_layer=layer,
        select_strategy={"default": "patch", "full": "full"}[strategy],
        image_token_id=LLAVA_DEFAULTS["image_token_index"] if token is None else token,
        **_special_ids(t, d),
    )


def is_original_llava(d: dict) -> bool:
    """An original LLaVA / GeoChat config: a LLaMA config with `mm_*` fields (model_type llava/geochat)."""
    arch = " ".join(d.get("architectures") or [])
    return any(k.startswith("mm_") for k in d) or bool(re.search(r"(Llava|GeoChat)Llama", arch))


def is_geochat(d: dict) -> bool:
    arch = " ".join(d.get("architectures") or [])
    return d.get("model_type") == "geochat" or "geochat" in arch.lower()


def original_llava_config(d: dict, vision: VisionConfig, image_token_id: int, where: str) -> LlavaConfig:
    """Original LLaVA / GeoChat config (LLaMA fields + mm_*) and a vision tower config -> LlavaConfig."""
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"{where}: mm_vision_select_feature={select!r}; expected patch or cls_patch")
    kind = d.get("mm_projector_type", "linear")
    if kind not in ("mlp2x_gelu", "linear"):
        raise ConversionError(f"{where}: mm_projector_type={kind!r}; supported: mlp2x_gelu, linear")
    if d.get("mm_hidden_size") not in (None, vision.hidden_size):
        raise ConversionError(
            f"{where}: mm_hidden_size={d['mm_hidden_size']} but the vision tower has width "
            f"{vision.hidden_size}"
        )
    return LlavaConfig(
        vision=vision,
        text=text_config(d, where),
        projector_type=kind,
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        select_strategy="patch" if select == "patch" else "full",
        image_token_id=image_token_id,
        **_special_ids(d, d),
    )


def vision_from_shapes(shapes: dict[str, tuple], prefix: str, where: str) -> VisionConfig:
    """Infers a CLIP config from tensor shapes (canonical keys under `prefix`); the head count assumes
    head_dim 64, as in every OpenAI CLIP ViT (B/32, B/16, L/14). Used when an original checkpoint carries its
    own tower and no --vision-tower config is given."""
    try:
        width = shapes[prefix + "embeddings.class_embedding"][0]
        out_c, in_c, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
        rows = shapes[prefix + "embeddings.position_embedding.weight"][0]
        mlp = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ConversionError(f"{where}: cannot infer the vision tower config: missing tensor {e}") from e
    layers = {
        int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))
    }
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise ConversionError(f"{where}: vision position table has {rows} rows, not 1 + a square")
    return VisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_layers=max(layers) + 1,
        num_heads=max(1, width // 64),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=in_c,
    )


# -------------------------------------------------------------------------------------------------- export
def hf_llava_dict(cfg: LlavaConfig, vocab_size: int, dtype: str) -> dict:
    """config.json of an HF LlavaForConditionalGeneration for our config (loads in transformers 4.57, 5.x)."""
    if cfg.projector_type != "mlp2x_gelu":
        raise ConversionError("export: transformers' Llava has only the 2-layer GELU projector (mlp2x_gelu)")
    v, t = cfg.vision, cfg.text
    text = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act="silu",
        rope_theta=t.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        torch_dtype=dtype,
        dtype=dtype,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
        projection_dim=v.hidden_size,
    )
    return dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        text_config=text,
        vision_config=vision,
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.image_seq_length,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy={"patch": "default", "full": "full"}[cfg.select_strategy],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        torch_dtype=dtype,
        dtype=dtype,
    )


def preprocessor_dict(cfg: LlavaConfig) -> dict:
    """CLIPImageProcessor at the model's resolution (resize shortest edge, centre crop, normalise)."""
    s = cfg.vision.image_size
    return dict(
        image_processor_type="CLIPImageProcessor",
        processor_class="LlavaProcessor",
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": s},
        resample=3,
        do_center_crop=True,
        crop_size={"height": s, "width": s},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def processor_dict(cfg: LlavaConfig) -> dict:
    return dict(
        processor_class="LlavaProcessor",
        patch_size=cfg.vision.patch_size,
        image_token="<image>",
        vision_feature_select_strategy={"patch": "default", "full": "full"}[cfg.select_strategy],
        num_additional_image_tokens=1,
    )
