"""PEFT LoRA adapters: merged by us == PEFT's merge_and_unload; kept as our LoRA params; exported merged."""

import copy

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from peft import LoraConfig, get_peft_model
from test_convert_testlib import batch, hf_logits, max_diff, our_logits, state_dict, tiny_llava

from rskd_jax import load_pretrained
from rskd_jax.convert import (
    ConversionError,
    export_checkpoint,
    export_model,
    import_checkpoint,
    inspect_path,
)
from rskd_jax.train.checkpoint import Checkpointer

LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_adapter(hf, d, seed, **kw):
    """A PEFT adapter with random (non-zero) A and B, saved to `d`; returns PEFT's merged model."""
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(lora_dropout=0.0, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(d)
    return pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    hf = tiny_llava(seed=11)
    hf.save_pretrained(d / "base")
    return d, hf


def test_merge_equals_peft_merge_and_unload(base):
    """rsLoRA scale, adapters on LLaMA, CLIP and projector linears, and a modules_to_save lm_head."""
    d, hf = base
    targets = LLM_TARGETS[:-1] + r"|linear_1)|.*vision_tower.*\.q_proj"
    merged = make_adapter(
        hf,
        d / "ad1",
        1,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=targets,
        modules_to_save=["lm_head"],
    )
    import_checkpoint(d / "base", d / "m1", lora=d / "ad1", progress=False)
    ids, px = batch()
    want = hf_logits(merged, ids, px)
    model, _ = load_pretrained(d / "m1")
    scale = max(1.0, float(np.abs(want).max()))
    assert max_diff(our_logits(model, ids, px), want) <= 1e-4 * scale  # float32 model parity
    assert max_diff(want, hf_logits(hf, ids, px)) > 0.1 * scale  # the adapter matters
    # The merged weights themselves: exported back to HF layout, equal to PEFT's up to float32 rounding.
    export_checkpoint(d / "m1", d / "m1_hf", progress=False)
    back = transformers.LlavaForConditionalGeneration.from_pretrained(d / "m1_hf").eval()
    sb, sm = state_dict(back), state_dict(merged)
    assert sb.keys() == sm.keys()
    for k in sm:
        torch.testing.assert_close(sb[k], sm[k], atol=1e-6, rtol=1e-6)
    assert max_diff(hf_logits(back, ids, px), want) <= 1e-5 * scale
    info = inspect_path(d / "ad1")
    assert info["format"] == "peft-lora" and info["adapter"]["r"] == 4 and info["adapter"]["use_rslora"]


def test_keep_mode_and_merged_exports(base):
    d, hf = base
    merged = make_adapter(hf, d / "ad2", 2, r=4, lora_alpha=16, target_modules=LLM_TARGETS)
    import_checkpoint(d / "base", d / "k", lora=d / "ad2", lora_mode="keep", progress=False)
    model, cfg = load_pretrained(d / "k")
    assert (
        model.llm.layers.q_proj.lora_a[...].shape == (2, 64, 4) and model.llm.layers.q_proj.lora_scale == 4.0
    )
    ids, px = batch()
    want = hf_logits(merged, ids, px)
    scale = max(1.0, float(np.abs(want).max()))
    assert max_diff(our_logits(model, ids, px), want) <= 1e-4 * scale

    export_checkpoint(d / "k", d / "exp_ckpt", progress=False)  # merges the kept adapters
    export_model(model, cfg, d / "exp_model")  # the trainer's path: in-memory model, not modified
    assert model.llm.layers.q_proj.lora_a is not None
    a = transformers.LlavaForConditionalGeneration.from_pretrained(d / "exp_ckpt").eval()
    b = transformers.LlavaForConditionalGeneration.from_pretrained(d / "exp_model").eval()
    sa, sb, sm = state_dict(a), state_dict(b), state_dict(merged)
    for k in sm:
        assert torch.equal(sa[k], sb[k]), k
        torch.testing.assert_close(sa[k], sm[k], atol=1e-6, rtol=1e-6)
    assert max_diff(hf_logits(a, ids, px), want) <= 1e-5 * scale

    # A training run's student, saved by the trainer's Checkpointer (orbax OCDBT, nnx State `value` leaves).
    with Checkpointer(d / "run" / "distill" / "checkpoints") as ck:
        ck.save(3, {"student": nnx.state(model, nnx.Param), "step": 3})
    run_ckpts = d / "run" / "distill" / "checkpoints"
    with pytest.raises(ConversionError, match="--lora-alpha"):
        export_checkpoint(run_ckpts, d / "exp_run", model_config=cfg, progress=False)
    export_checkpoint(run_ckpts, d / "exp_run", model_config=cfg, lora_alpha=16, progress=False)
    c = state_dict(transformers.LlavaForConditionalGeneration.from_pretrained(d / "exp_run"))
    for k in sm:
        assert torch.equal(c[k], sb[k]), k


def test_keep_mode_needs_every_layer_merge_does_not(base):
    d, hf = base
    merged = make_adapter(
        hf,
        d / "ad3",
        3,
        r=2,
        lora_alpha=2,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[0],
        layers_pattern="layers",
    )
    with pytest.raises(ConversionError, match="lora-mode merge"):
        import_checkpoint(d / "base", d / "bad", lora=d / "ad3", lora_mode="keep", progress=False)
    assert not (d / "bad").exists()
    import_checkpoint(d / "base", d / "ok", lora=d / "ad3", progress=False)
    ids, px = batch()
    want = hf_logits(merged, ids, px)
    model, _ = load_pretrained(d / "ok")
    assert max_diff(our_logits(model, ids, px), want) <= 1e-4 * max(1.0, float(np.abs(want).max()))
