"""Helpers shared by the converter tests (this file holds no tests): tiny random HF models built with
transformers' own config classes, key renamings into the other on-disk layouts, and a tiny tokenizer."""

import json
import pathlib
import string

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from test_models_testlib import randomize_  # one weight randomiser for every HF parity test

IMAGE_ID = 127  # hf-llava tiny models: <image> is the last row of a 128-word vocabulary


def hf_config(
    kv_heads=2, image_size=32, image_token_index=IMAGE_ID, layers=2, vision_width=32, vision_heads=4
):
    vision = transformers.CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=3,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=8,
    )
    text = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
    )
    return transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // 8) ** 2,
    )


def tiny_llava(kv_heads: int = 2, seed: int = 0, **kw) -> transformers.LlavaForConditionalGeneration:
    return randomize_(transformers.LlavaForConditionalGeneration(hf_config(kv_heads, **kw)).eval(), seed)


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_4x_layout(sd: dict) -> dict:
    """5.x in-memory keys -> 4.x llava-hf on-disk layout (vision_tower.vision_model.*, language_model.*)."""
    rules = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v
    return out


def to_original_layout(sd: dict) -> dict:
    """5.x in-memory keys -> original LLaVA / GeoChat keys (model.layers.*, model.mm_projector.0/2, ...)."""
    rules = [
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.language_model.", "model."),
    ]
    out = {}
    for k, v in sd.items():
        for a, b in rules:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v
    return out


def save_sharded(sd: dict, d: pathlib.Path, kind: str = "safetensors", per_shard: int = 20) -> None:
    """Sharded checkpoint with an HF index (model.safetensors.index.json / pytorch_model.bin.index.json)."""
    d.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    chunks = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    ext, stem = ("safetensors", "model") if kind == "safetensors" else ("bin", "pytorch_model")
    weight_map = {}
    for i, ks in enumerate(chunks):
        name = f"{stem}-{i + 1:05d}-of-{len(chunks):05d}.{ext}"
        part = {k: sd[k] for k in ks}
        save_file(part, d / name, metadata={"format": "pt"}) if ext == "safetensors" else torch.save(
            part, d / name
        )
        weight_map.update({k: name for k in ks})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
        "weight_map": weight_map,
    }
    (d / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def save_tokenizer(d: pathlib.Path, size: int) -> None:
    """A LLaMA-style tokenizer with exactly `size` entries (no `<image>`), saved into `d`."""
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!'")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["▁", *chars]:
        vocab.setdefault(c, len(vocab))
    i = 0
    while len(vocab) < size:
        vocab[f"▁{chars[i % len(chars)]}{i // len(chars) or ''}"] = len(vocab)
        i += 1
    transformers.LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(str(d))


def batch(image_size: int = 32, image_id: int = IMAGE_ID, seed: int = 0, rows: int = 2):
    """input_ids [rows, T] with one image (image_size/8)^2 tokens per row, NHWC pixels."""
    n = (image_size // 8) ** 2
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 120, (rows, n + 8))
    ids[:, 3 : 3 + n] = image_id
    px = rng.standard_normal((rows, image_size, image_size, 3)).astype(np.float32)
    return ids, px


def hf_logits(model, ids, px) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(px).permute(0, 3, 1, 2)
        ).logits.numpy()


def our_logits(model, ids, px) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx

    return np.asarray(nnx.jit(lambda m, i, p: m(i, p).logits)(model, jnp.asarray(ids), jnp.asarray(px)))


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max())
