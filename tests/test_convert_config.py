"""config.json parsing without transformers, checked against transformers' own parsing (defaults included)."""

import json

import pytest
import transformers

from rskd_jax.convert import ConversionError, detect_format, hfconfig

# llava-hf/llava-1.5-7b-hf style: written by transformers 4.36 with only non-default fields.
HUB_LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def reference(d: dict, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return transformers.LlavaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("d", [HUB_LLAVA, {"model_type": "llava"}], ids=["hub-diff-only", "all-defaults"])
def test_llava_config_matches_transformers(d, tmp_path):
    ours, ref = hfconfig.llava_config(d, "config.json"), reference(d, tmp_path)
    v, t = ref.vision_config, ref.text_config
    assert ours.vision == hfconfig.VisionConfig(
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
    assert ours.text == hfconfig.TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_parameters["rope_theta"],
        max_position_embeddings=t.max_position_embeddings,
    )
    assert ours.image_token_id == ref.image_token_id
    assert ours.vision_feature_layer == ref.vision_feature_layer
    assert ours.select_strategy == {"default": "patch", "full": "full"}[ref.vision_feature_select_strategy]


def test_clip_configs_match_transformers(tmp_path):
    diff = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "num_attention_heads": 2,
        "image_size": 336,
        "patch_size": 14,
    }
    ref = transformers.CLIPVisionConfig(**{k: v for k, v in diff.items() if k != "model_type"})
    ours = hfconfig.vision_config(diff, "x")
    assert (
        ours.hidden_size,
        ours.intermediate_size,
        ours.num_layers,
        ours.layer_norm_eps,
        ours.hidden_act,
    ) == (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.layer_norm_eps, ref.hidden_act)
    full = {"model_type": "clip", "vision_config": diff, "text_config": {"hidden_size": 8}}
    assert hfconfig.vision_config(full, "x") == ours


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling"),
        ({"attention_bias": True}, "bias"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_text_features(change, match):
    with pytest.raises(ConversionError, match=match):
        hfconfig.text_config({"model_type": "llama", **change}, "cfg.json")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"projector_hidden_act": "relu"}, "projector"),
        ({"vision_feature_layer": [-2, -5]}, "single int layer"),
        ({"vision_feature_select_strategy": "cls"}, "default/full"),
    ],
)
def test_unsupported_llava_features(change, match):
    with pytest.raises(ConversionError, match=match):
        hfconfig.llava_config({**HUB_LLAVA, **change}, "cfg.json")


def test_original_llava_config_and_detection(tmp_path):
    vision = hfconfig.vision_config(HUB_LLAVA["vision_config"], "v")
    liuhaotian = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "hidden_size": 4096,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    }
    cfg = hfconfig.original_llava_config(liuhaotian, vision, 32000, "c")
    assert cfg.projector_type == "linear"  # LLaVA's default when mm_projector_type is absent
    assert (
        cfg.select_strategy == "full"
        and cfg.image_seq_length == 577
        and cfg.text.max_position_embeddings == 4096
    )
    # model_type 'llava' with mm_* fields is the original layout, not transformers' Llava.
    assert detect_format(tmp_path, liuhaotian, ["model.layers.0.mlp.up_proj.weight"]) == "llava"
    assert detect_format(tmp_path, {"model_type": "geochat"}, ["model.mm_projector.0.weight"]) == "geochat"
    assert detect_format(tmp_path, HUB_LLAVA, ["language_model.model.norm.weight"]) == "hf-llava"
    assert detect_format(tmp_path, {"model_type": "llama"}, ["model.norm.weight"]) == "llama"
    with pytest.raises(ConversionError, match="mm_hidden_size=768"):
        hfconfig.original_llava_config({**liuhaotian, "mm_hidden_size": 768}, vision, 32000, "c")
