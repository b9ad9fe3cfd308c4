"""HF Llava (three key layouts, safetensors / .bin, single / sharded) -> import -> export -> transformers.

The exported directory must load in transformers with tensors identical to the original and logits within
1e-6; our imported model must match transformers' logits. float32 throughout.
"""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from test_convert_testlib import (
    IMAGE_ID,
    batch,
    hf_logits,
    max_diff,
    our_logits,
    save_sharded,
    save_tokenizer,
    state_dict,
    tiny_llava,
    to_4x_layout,
)

from rskd_jax import load_pretrained
from rskd_jax.convert import (
    ConversionError,
    export_checkpoint,
    from_torch,
    hfconfig,
    import_checkpoint,
    inspect_path,
)
from rskd_jax.convert.statedict import params_from_state_dict, state_dict_from_params
from rskd_jax.models import LlavaModel


def write_source(layout: str, model, d):
    """Writes `model` in one of the HF on-disk layouts."""
    if (
        layout == "5x-disk"
    ):  # transformers 5.x save_pretrained: language_model.model.*, vision_tower.* (no vision_model)
        model.save_pretrained(d)
    elif layout == "4x-sharded":  # llava-hf hub layout, sharded safetensors + index
        save_sharded(to_4x_layout(state_dict(model)), d, "safetensors", per_shard=25)
        model.config.save_pretrained(d)
    elif layout == "5x-memory-bin":  # 5.x in-memory keys (model.language_model.*), sharded pytorch_model.bin
        save_sharded(state_dict(model), d, "bin", per_shard=40)
        model.config.save_pretrained(d)
    else:
        raise ValueError(layout)


@pytest.mark.parametrize("layout,kv_heads", [("5x-disk", 2), ("4x-sharded", 4), ("5x-memory-bin", 2)])
def test_roundtrip(tmp_path, layout, kv_heads):
    hf = tiny_llava(kv_heads=kv_heads, seed=kv_heads)
    src, ours, out = tmp_path / "src", tmp_path / "ours", tmp_path / "hf_out"
    write_source(layout, hf, src)
    save_tokenizer(src, IMAGE_ID)  # 127 words: <image> is added as id 127, as in the model config
    import_checkpoint(src, ours, progress=False)
    assert json.loads((ours / "config.json").read_text())["text"]["num_kv_heads"] == kv_heads

    ids, px = batch()
    ref = hf_logits(hf, ids, px)
    model, cfg = load_pretrained(ours)
    scale = max(1.0, float(np.abs(ref).max()))
    assert max_diff(our_logits(model, ids, px), ref) <= 1e-4 * scale

    export_checkpoint(ours, out, max_shard_size="60KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # sharded export
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    a, b = state_dict(hf), state_dict(back)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert max_diff(hf_logits(back, ids, px), ref) <= 1e-6
    # 4.x llava-hf key layout on disk, tokenizer with <image> and the processor at the model's resolution.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(
        k.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model."))
        for k in index
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID == back.config.image_token_id
    assert back.config.image_seq_length == 16 and back.config.vision_feature_select_strategy == "default"
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["crop_size"] == {"height": 32, "width": 32} and proc["size"] == {"shortest_edge": 32}


def test_orbax_layout_sharded_restore_and_relayout(tmp_path):
    """Our checkpoint restores into target shardings on an 8-device mesh, and into the per-layer layout."""
    hf = tiny_llava(seed=7)
    hf.save_pretrained(tmp_path / "src")
    import_checkpoint(tmp_path / "src", tmp_path / "ours", dtype="bfloat16", progress=False)
    ids, px = batch()
    ref = hf_logits(hf, ids, px)
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model, cfg = load_pretrained(tmp_path / "ours", mesh=mesh, dtype="float32")
    gate = model.llm.layers.gate_proj.kernel[...]
    assert isinstance(gate.sharding, NamedSharding) and gate.sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    assert cfg.param_dtype == "float32" and gate.dtype == np.float32
    # Stored in bfloat16: logits within bf16 rounding of the weights.
    scale = max(1.0, float(np.abs(ref).max()))
    assert max_diff(our_logits(model, ids, px), ref) <= 0.05 * scale
    flat, _ = load_pretrained(tmp_path / "ours", dtype="float32", scan_layers=False)
    assert isinstance(flat.llm.layers, nnx.List)
    np.testing.assert_array_equal(np.asarray(flat.llm.layers[1].gate_proj.kernel[...]), np.asarray(gate[1]))
    info = inspect_path(tmp_path / "ours")
    assert info["dtypes"] == {"bfloat16": info["params"]["total"]}
    n = sum(p.numel() for p in hf.parameters())
    assert info["params"]["total"] == n


def test_in_memory_state_dict_api():
    """params_from_state_dict / state_dict_from_params: same table, in memory (for from_torch and tests)."""
    hf = tiny_llava(seed=9)
    sd = {k: v.numpy() for k, v in state_dict(hf).items()}
    for scan in (True, False):
        cfg = hfconfig.llava_config(hf.config.to_dict(), "tiny").replace(scan_layers=scan)
        tree = params_from_state_dict(cfg, to_4x_layout(sd))
        back = state_dict_from_params(cfg, tree)
        assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
        assert state_dict_from_params(cfg, tree, export_layout=True).keys() == to_4x_layout(sd).keys()
    model = from_torch.load_params(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0))), tree)
    ids, px = batch()
    ref = hf_logits(hf, ids, px)
    assert max_diff(our_logits(model, ids, px), ref) <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    with pytest.raises(ConversionError, match="missing .*linear_2.bias.*unexpected.*extra"):
        params_from_state_dict(cfg, {**{k: v for k, v in sd.items() if "linear_2.bias" not in k}, "extra": 1})
