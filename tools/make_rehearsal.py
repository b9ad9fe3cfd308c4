r"""Writes the inputs of the `rehearsal` preset (configs/distill.py:rehearsal) into ROOT, in the layouts a real
GeoChat user has on disk, at reduced size:

    ROOT/clip/            the shared vision tower: a transformers CLIPModel directory (as
                          openai/clip-vit-large-patch14-336: 336 px, patch 14, text half included)
    ROOT/geochat13b/      teacher in GeoChat's original release layout: LLaMA keys (model.layers.*), the
                          mm_projector (model.mm_projector.0/2) inside, pytorch_model-*.bin shards + index,
                          GeoChat's config.json (mm_vision_tower, mm_hidden_size, ...), a LLaMA tokenizer
    ROOT/geochat7b/       student, the same layout with a narrower and shallower LLM (feature maps are real
                          projections: teacher width 128, student width 64)
    ROOT/images/          UC Merced JPEGs (from --ucm, e.g. ../shared/data) and rs-synth PNGs
    ROOT/instruct.json    GeoChat_Instruct-format records (id, image, conversations) over those images
    ROOT/ucm_eval/        a small UC Merced class-folder tree for `launch/eval.py --config configs/eval.py:scene`
                          (rs-synth test images in class folders when no --ucm is given)

    python tools/make_rehearsal.py ROOT [--ucm ../shared/data]

Weights are random (torch + transformers, the `test` extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import string
import sys

import numpy as np

VOCAB = 256
VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1, patch_size=14
)
TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2)
STUDENT = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=1)
UCM_PER_CLASS = 3  # training images per UC Merced class (21 classes)
UCM_EVAL_CLASSES, UCM_EVAL_PER_CLASS = 4, 2
N_SYNTH = 40


def save_tokenizer(d: pathlib.Path, size: int = VOCAB) -> None:
    """A LLaMA tokenizer (character pieces) with exactly `size` entries and no `<image>`, as GeoChat ships."""
    import transformers

    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,?!'-:;()[]{}<>|/\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["▁", *chars]:
        vocab.setdefault(c, len(vocab))
    i = 0
    while len(vocab) < size:
        vocab[f"▁{chars[i % len(chars)]}{i // len(chars) or ''}"] = len(vocab)
        i += 1
    transformers.LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True).save_pretrained(str(d))


def write_clip(d: pathlib.Path, seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        vision_config=dict(
            image_size=336, intermediate_size=VISION["intermediate_size"], **_no_inter(VISION)
        ),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32,
    )
    transformers.CLIPModel(cfg).save_pretrained(str(d))


def _no_inter(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "intermediate_size"}


def write_geochat(d: pathlib.Path, text: dict, seed: int) -> None:
    """LLaMA + mm_projector in GeoChat's original layout (.bin shards + index), GeoChat's config.json."""
    import torch
    import transformers

    torch.manual_seed(seed)
    lcfg = transformers.LlamaConfig(
        vocab_size=VOCAB, num_key_value_heads=text["num_attention_heads"], max_position_embeddings=512, **text
    )
    llm = transformers.LlamaForCausalLM(lcfg)
    for p in llm.parameters():  # larger weights than the default init: the models' outputs differ visibly
        torch.nn.init.normal_(p, std=0.08) if p.ndim > 1 else None
    sd = {k: v.detach().clone().contiguous() for k, v in llm.state_dict().items()}
    w = text["hidden_size"]
    sd["model.mm_projector.0.weight"] = torch.randn(w, VISION["hidden_size"]) * 0.08
    sd["model.mm_projector.0.bias"] = torch.randn(w) * 0.02
    sd["model.mm_projector.2.weight"] = torch.randn(w, w) * 0.08
    sd["model.mm_projector.2.bias"] = torch.randn(w) * 0.02
    d.mkdir(parents=True)
    keys = list(sd)
    chunks = [keys[i : i + 12] for i in range(0, len(keys), 12)]
    weight_map = {}
    for i, ks in enumerate(chunks):
        name = f"pytorch_model-{i + 1:05d}-of-{len(chunks):05d}.bin"
        torch.save({k: sd[k] for k in ks}, d / name)
        weight_map.update({k: name for k in ks})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config = dict(
        architectures=["GeoChatLlamaForCausalLM"],
        model_type="geochat",
        vocab_size=VOCAB,
        num_hidden_layers=text["num_hidden_layers"],
        hidden_size=w,
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_attention_heads"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=VISION["hidden_size"],
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        torch_dtype="float32",
    )
    (d / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(d)


def _scene_question() -> str:
    # GeoChat_Instruct lists all 21 classes; a short question keeps the rehearsal's character-level prompts short
    return "<image>\nWhat is the land use class of this image? Answer in one word."


def write_data(root: pathlib.Path, ucm: pathlib.Path | None, seed: int) -> int:
    """instruct.json over UC Merced (when `ucm` is given) and rs-synth images; returns the record count."""
    from PIL import Image

    from rskd_jax.data import SynthSource

    images = root / "images"
    images.mkdir(parents=True)
    records = []
    if ucm is not None:
        src = ucm / "UCMerced_LandUse" / "Images"
        classes = sorted(p.name for p in src.iterdir() if p.is_dir())
        for c in classes:
            for k in range(UCM_PER_CLASS):
                name = f"{c}{k:02d}.jpg"
                (images / "ucm").mkdir(exist_ok=True)
                shutil.copy(src / c / name, images / "ucm" / name)
                q = _scene_question()
                records.append(
                    dict(
                        id=f"ucm_{c}{k:02d}",
                        image=f"ucm/{name}",
                        conversations=[dict({"from": "human", "value": q}), {"from": "gpt", "value": c}],
                    )
                )
        ev = root / "ucm_eval" / "UCMerced_LandUse" / "Images"
        for c in classes[:UCM_EVAL_CLASSES]:
            (ev / c).mkdir(parents=True)
            for k in range(UCM_EVAL_PER_CLASS):
                name = f"{c}{UCM_PER_CLASS + k:02d}.jpg"
                shutil.copy(src / c / name, ev / c / name)
    else:  # no UC Merced here: the scene evaluation set is a class-folder tree of rs-synth test images
        test = SynthSource(4 * UCM_EVAL_CLASSES * UCM_EVAL_PER_CLASS, image_size=128, seed=seed, split="test")
        for i in range(len(test)):
            r = test[i]
            d = root / "ucm_eval" / r["meta"]["scene"]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(r["image"])).save(d / f"{i:03d}.png")
    synth = SynthSource(N_SYNTH, image_size=128, seed=seed, split="train")
    (images / "synth").mkdir()
    for i in range(N_SYNTH):
        r = synth[i]
        name = f"synth{i:03d}.png"
        Image.fromarray(np.asarray(r["image"])).save(images / "synth" / name)
        conv = [dict(t) for t in r["conversations"]]
        records.append(dict(id=f"synth_{i}", image=f"synth/{name}", conversations=conv))
    (root / "instruct.json").write_text(json.dumps(records, indent=1))
    return len(records)


def make(root: str | pathlib.Path, ucm: str | pathlib.Path | None = None, seed: int = 0) -> pathlib.Path:
    root = pathlib.Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty")
    root.mkdir(parents=True, exist_ok=True)
    write_clip(root / "clip", seed)
    write_geochat(root / "geochat13b", TEACHER, seed + 1)
    write_geochat(root / "geochat7b", STUDENT, seed + 2)
    n = write_data(root, pathlib.Path(ucm) if ucm else None, seed)
    print(f"rehearsal inputs in {root}: CLIP tower, teacher, student, {n} instruct records")
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="output directory (must be empty or absent)")
    ap.add_argument("--ucm", default=None, help="shared data folder holding UCMerced_LandUse/ (optional)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        make(a.root, a.ucm, a.seed)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.exit(main())
