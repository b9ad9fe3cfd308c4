"""Presets and the per-component parameter counts of geochat.md section 2 (abstract models only)."""

import json

import pytest

from rskd_jax.models import LlavaConfig, get_preset, param_counts

CLIP_L14_336 = 303_507_456  # HF CLIPVisionModel, 577-row position table
CLIP_L14_504 = 304_244_736  # same tower with the 1297-row interpolated table
LLAMA_7B, LLAMA_13B = 6_738_415_616, 13_015_864_320


def test_geochat_7b_counts_paper_convention():
    c = param_counts(get_preset("geochat_7b"))
    assert c["paper_total"] == 6_760_723_456  # the seed paper's "6760.72M"
    assert c["llm"] == LLAMA_7B
    assert c["projector"] == 20_979_712
    assert c["position_table"] == 1297 * 1024
    assert c["vision"] == CLIP_L14_504
    assert c["total"] == 7_063_640_064
    assert "lora" not in c


def test_other_presets():
    c = param_counts(get_preset("llava15_7b"))
    assert c["vision"] == CLIP_L14_336 and c["position_table"] == 577 * 1024
    assert c["vision_without_pos"] == CLIP_L14_504 - 1297 * 1024
    c13 = param_counts(get_preset("geochat_13b"))
    assert c13["llm"] == LLAMA_13B
    assert c13["projector"] == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    cfg = get_preset("geochat_13b")
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_heads, cfg.text.intermediate_size) == (
        5120,
        40,
        40,
        13824,
    )


def test_image_seq_length_and_config_roundtrip():
    cfg = get_preset("geochat_7b")
    assert cfg.image_seq_length == 1296 and cfg.vision.num_positions == 1297
    assert get_preset("llava15_7b").image_seq_length == 576
    assert cfg.replace(select_strategy="full").image_seq_length == 1297
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert get_preset("tiny", scan_layers=False, dtype="bfloat16").dtype == "bfloat16"


def test_bad_config_and_unknown_preset():
    with pytest.raises(KeyError, match="geochat_7b"):
        get_preset("nope")
    with pytest.raises(ValueError, match="select_strategy"):
        get_preset("tiny", select_strategy="default")
    with pytest.raises(ValueError, match="remat_policy"):
        get_preset("tiny", remat_policy="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        get_preset("tiny", dtype="float33")
