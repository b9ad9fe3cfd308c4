"""Original LLaVA / GeoChat layout (and separate parts) -> import with GeoChat's position-table interpolation.

The reference is a PyTorch LlavaForConditionalGeneration at the new resolution whose position table is made by
GeoChat's own recipe (torch bicubic interpolate, align_corners=True, CLS row kept), written out here.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from test_convert_testlib import (
    batch,
    hf_config,
    hf_logits,
    max_diff,
    our_logits,
    save_sharded,
    save_tokenizer,
    state_dict,
    tiny_llava,
    to_original_layout,
    write_json,
)

from rskd_jax import load_pretrained
from rskd_jax.convert import export_checkpoint, import_checkpoint, inspect_path
from rskd_jax.convert.ckpt import CheckpointReader

OLD, NEW = 32, 48  # image sizes: 4x4 patches (17-row table) -> 6x6 (37 rows)
VOCAB = 128  # GeoChat keeps the LLaMA vocabulary: <image> becomes the placeholder id 128


def geochat_interpolate(table: torch.Tensor, grid: int) -> torch.Tensor:
    """GeoChat's CLIPVisionTower.clip_interpolate_embeddings, for one table."""
    g = math.isqrt(table.shape[0] - 1)
    patch = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=True)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("geochat")
    # CLIP width 128 / 2 heads: head_dim 64, as the tower config inferred from shapes assumes (OpenAI CLIP).
    hf = tiny_llava(seed=3, image_size=OLD, vision_width=128, vision_heads=2)
    sd = state_dict(hf)
    orig = to_original_layout(sd)
    for i in range(2):  # transformers 4.31 stored the rotary buffer: must be skipped
        orig[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    t = hf.config.text_config
    geochat_cfg = dict(
        architectures=["GeoChatLlamaForCausalLM"],
        model_type="geochat",
        vocab_size=VOCAB,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=500.0,
        max_position_embeddings=t.max_position_embeddings,
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=128,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        torch_dtype="float32",
    )
    src = d / "geochat"
    save_sharded(orig, src, "bin", per_shard=30)
    write_json(src / "config.json", geochat_cfg)
    save_tokenizer(src, VOCAB)

    # Reference at the new size, with GeoChat's table.
    ref = transformers.LlavaForConditionalGeneration(
        hf_config(image_size=NEW, vision_width=128, vision_heads=2)
    ).eval()
    new_sd = dict(sd)
    key = "model.vision_tower.embeddings.position_embedding.weight"
    new_sd[key] = geochat_interpolate(sd[key], NEW // 8)
    ref.load_state_dict(new_sd, strict=True)
    return d, src, sd, ref, geochat_cfg


def test_geochat_import_matches_interpolated_reference_and_exports(setup):
    d, src, sd, ref, _ = setup
    ours = d / "ours"
    import_checkpoint(src, ours, image_size=NEW, progress=False)
    cfg = json.loads((ours / "config.json").read_text())
    assert cfg["vision"]["image_size"] == NEW and cfg["image_token_id"] == VOCAB
    assert json.loads((ours / "convert.json").read_text())["source_format"] == "geochat"
    model, cfg = load_pretrained(ours)
    assert model.vision.pos_embed[...].shape == ((NEW // 8) ** 2 + 1, 128)
    # GeoChat's recipe evaluated in float64 (the float32 torch kernel differs by rounding, ~2e-6).
    key = "model.vision_tower.embeddings.position_embedding.weight"
    exact = geochat_interpolate(sd[key].double(), NEW // 8).numpy()
    np.testing.assert_allclose(np.asarray(model.vision.pos_embed[...]), exact, atol=1e-6, rtol=0)

    ids, px = batch(NEW, image_id=VOCAB)
    ref_ids = np.where(ids == VOCAB, 127, ids)  # the reference config uses in-vocabulary id 127
    want = hf_logits(ref, ref_ids, px)
    scale = max(1.0, float(np.abs(want).max()))
    assert max_diff(our_logits(model, ids, px), want) <= 1e-4 * scale

    out = d / "hf_out"
    export_checkpoint(ours, out, progress=False)
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert back.config.vision_config.image_size == NEW and back.config.image_seq_length == (NEW // 8) ** 2
    assert back.config.text_config.vocab_size == VOCAB + 1 and back.config.image_token_id == VOCAB
    got = hf_logits(back, ids, px)
    assert max_diff(got[..., :VOCAB], want) <= 1e-4 * scale
    emb = back.model.language_model.embed_tokens.weight.detach()
    assert torch.equal(emb[:VOCAB], sd["model.language_model.embed_tokens.weight"])
    torch.testing.assert_close(emb[VOCAB], sd["model.language_model.embed_tokens.weight"].mean(0))
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>") == VOCAB


def test_vision_tower_dir_and_parts_give_the_same_checkpoint(setup):
    """--vision-tower (a CLIPModel dir: 4.x keys + text half) and --format parts == the checkpoint's tower."""
    d, src, sd, _, geochat_cfg = setup
    vis = {k[len("model.vision_tower.") :]: v for k, v in sd.items() if k.startswith("model.vision_tower.")}
    clip = d / "clip"
    clip.mkdir()
    full = {f"vision_model.{k}": v for k, v in vis.items()}
    full.update(
        {
            "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
            "logit_scale": torch.tensor(2.0),
            "visual_projection.weight": torch.zeros(8, 128),
        }
    )
    save_file(full, clip / "model.safetensors")
    vc = hf_config(image_size=OLD, vision_width=128, vision_heads=2).vision_config.to_dict()
    write_json(clip / "config.json", {"model_type": "clip", "vision_config": vc})

    no_vision = {k: v for k, v in to_original_layout(sd).items() if not k.startswith("model.vision_tower.")}
    ckpt_only = d / "no_vision"
    save_sharded(no_vision, ckpt_only, "safetensors", per_shard=1000)
    write_json(ckpt_only / "config.json", geochat_cfg)

    llama = d / "llama"
    lm_keys = {k: v for k, v in no_vision.items() if not k.startswith("model.mm_projector.")}
    save_sharded(lm_keys, llama, "safetensors", per_shard=1000)
    write_json(
        llama / "config.json",
        {k: v for k, v in geochat_cfg.items() if not k.startswith("mm_")}
        | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    )
    save_tokenizer(llama, VOCAB)
    proj = d / "pretrain"
    proj.mkdir()
    torch.save(
        {k: v for k, v in no_vision.items() if k.startswith("model.mm_projector.")}, proj / "mm_projector.bin"
    )

    outs = {
        "own": import_checkpoint(src, d / "a", image_size=NEW, progress=False),
        "vision_tower": import_checkpoint(
            ckpt_only, d / "b", vision_tower=clip, image_size=NEW, progress=False
        ),
        "parts": import_checkpoint(
            llama, d / "c", fmt="parts", vision_tower=clip, mm_projector=proj, image_size=NEW, progress=False
        ),
    }
    readers = {k: CheckpointReader(v / "state") for k, v in outs.items()}
    keys = readers["own"].keys
    assert all(r.keys == keys for r in readers.values())
    for k in keys:
        a = readers["own"].read(k)
        for name in ("vision_tower", "parts"):
            np.testing.assert_array_equal(readers[name].read(k), a, err_msg=f"{name}: {k}")
    cfgs = {k: json.loads((v / "config.json").read_text()) for k, v in outs.items()}
    assert cfgs["own"] == cfgs["vision_tower"] == cfgs["parts"]
    prov = json.loads((outs["vision_tower"] / "convert.json").read_text())
    assert any("text_model" in x for x in prov["ignored"])


def test_geochat_defaults_and_inspect(setup):
    d, src, sd, *_ = setup
    info = inspect_path(src)
    assert info["format"] == "geochat" and info["config"]["vision"]["image_size"] == 504  # GeoChat default
    assert info["config"]["vision"]["num_heads"] == 2 and info["config"]["projector_type"] == "mlp2x_gelu"
    assert any("inv_freq" in x for x in info["ignored"])
    count = lambda prefix: sum(v.numel() for k, v in sd.items() if k.startswith(prefix))
    assert info["buffers"] == 2 and info["params"] == {
        "vision": count("model.vision_tower."),
        "projector": count("model.multi_modal_projector."),
        "llm": count("model.language_model.") + count("lm_head."),
        "total": sum(v.numel() for v in sd.values()),
    }
