"""The one HF <-> rskd_jax key map: table rows, per-key transforms, and the key layouts of every source.

Every tensor is named by its *canonical* HF key, the transformers 5.x in-memory
`LlavaForConditionalGeneration` layout (`model.vision_tower.*` without `vision_model.`,
`model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`, `lm_head.weight`). Source layouts are
mapped onto it by regex rules (`RULES`); export maps it onto the 4.x llava-hf layout (`export_key`), which
transformers 4.57 and 5.x both load.

A table row is (HF key suffix, our param path, transform). `entries(cfg)` expands the rows for a config into
one `Entry` per tensor (`vision_entries` / `text_entries`: the CLIP tower or the LLaMA decoder alone): for
scanned layers (`cfg.scan_layers`) the layer index is a slice of a stacked param, otherwise it is part of the
param path. The same entries run forwards (import) and backwards (export);
transforms work on row blocks of our layout so that no step needs a whole large tensor twice.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

VISION = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."
LLM = "model.language_model."
LM_HEAD = "lm_head.weight"

CLIP_TOP = [
    ("embeddings.class_embedding", "class_embed", "copy"),
    ("embeddings.patch_embedding.weight", "patch_embed", "conv"),
    ("embeddings.position_embedding.weight", "pos_embed", "pos"),
    ("pre_layrnorm.weight", "pre_ln.scale", "copy"),
    ("pre_layrnorm.bias", "pre_ln.bias", "copy"),
    ("post_layernorm.weight", "post_ln.scale", "copy"),
    ("post_layernorm.bias", "post_ln.bias", "copy"),
]
CLIP_LAYER = [
    *[
        (f"self_attn.{n}_proj.{w}", f"{n}_proj.{o}", t)
        for n in ("q", "k", "v", "out")
        for w, o, t in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
    ],
    ("layer_norm1.weight", "ln1.scale", "copy"),
    ("layer_norm1.bias", "ln1.bias", "copy"),
    ("layer_norm2.weight", "ln2.scale", "copy"),
    ("layer_norm2.bias", "ln2.bias", "copy"),
    ("mlp.fc1.weight", "fc1.kernel", "linear"),
    ("mlp.fc1.bias", "fc1.bias", "copy"),
    ("mlp.fc2.weight", "fc2.kernel", "linear"),
    ("mlp.fc2.bias", "fc2.bias", "copy"),
]
LLAMA_TOP = [("embed_tokens.weight", "embed_tokens", "copy"), ("norm.weight", "norm.scale", "copy")]
LLAMA_LAYER = [
    *[(f"self_attn.{n}_proj.weight", f"{n}_proj.kernel", "linear") for n in "qkvo"],
    *[(f"mlp.{n}_proj.weight", f"{n}_proj.kernel", "linear") for n in ("gate", "up", "down")],
    ("input_layernorm.weight", "input_norm.scale", "copy"),
    ("post_attention_layernorm.weight", "post_norm.scale", "copy"),
]
PROJECTOR_ROWS = [
    (f"linear_{j}.{w}", f"linear_{j}.{o}", t)
    for j in (1, 2)
    for w, o, t in (("weight", "kernel", "linear"), ("bias", "bias", "copy"))
]

# Buffers that some checkpoints store and that are never parameters.
IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")

# Source layout -> canonical key. First matching rule wins; a key that matches none is unexpected.
_HF = [
    (r"^model\.language_model\.", LLM),
    (r"^model\.multi_modal_projector\.", PROJECTOR),
    (r"^model\.vision_tower\.vision_model\.", VISION),
    (r"^model\.vision_tower\.", VISION),
    (r"^lm_head\.", "lm_head."),
    (r"^language_model\.model\.", LLM),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", VISION),
    (r"^vision_tower\.", VISION),
    (r"^multi_modal_projector\.", PROJECTOR),
]
_PROJ_FILE = [
    (r"^(model\.)?mm_projector\.0\.", PROJECTOR + "linear_1."),
    (r"^(model\.)?mm_projector\.2\.", PROJECTOR + "linear_2."),
    (r"^(model\.)?mm_projector\.(?=(weight|bias)$)", PROJECTOR + "linear_1."),  # 'linear' projector
]
_ORIGINAL = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", VISION),
    *_PROJ_FILE,
    (r"^model\.", LLM),
    (r"^lm_head\.", "lm_head."),
]
_CLIP = [
    (r"^vision_model\.", VISION),
    (r"^(?=(embeddings|pre_layrnorm|encoder|post_layernorm)\.)", VISION),
]
_LLAMA = [(r"^model\.", LLM), (r"^lm_head\.", "lm_head.")]
RULES = {"hf-llava": _HF, "llava": _ORIGINAL, "clip": _CLIP, "llama": _LLAMA, "projector": _PROJ_FILE}
# Keys a layout may hold that the model has no use for (a full CLIPModel's text half).
EXTRAS = {"clip": re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)")}

_EXPORT = [
    (VISION, "vision_tower.vision_model."),
    (PROJECTOR, "multi_modal_projector."),
    (LLM, "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]


def canonical_key(key: str, layout: str) -> str | None:
    """`key` of a source in `layout` (a RULES name) -> canonical key, or None if no rule matches."""
    for pat, rep in RULES[layout]:
        if re.match(pat, key):
            return re.sub(pat, rep, key, count=1)
    return None


def export_key(canonical: str) -> str:
    """Canonical key -> 4.x llava-hf on-disk key (`vision_tower.vision_model.*`, `language_model.model.*`)."""
    for old, new in _EXPORT:
        if canonical.startswith(old):
            return new + canonical[len(old) :]
    raise KeyError(f"no export name for {canonical!r}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: canonical HF key <-> (our param path, layer slice of a stacked param or None)."""

    hf: str
    param: tuple
    layer: int | None
    transform: str  # 'copy' | 'linear' | 'conv' | 'pos' (copy; the import may resize the table)


def entries(cfg) -> list[Entry]:
    """All base-model tensors of a LlavaConfig (no LoRA), in table order."""
    proj = PROJECTOR_ROWS if cfg.projector_type == "mlp2x_gelu" else PROJECTOR_ROWS[:2]
    return [
        *vision_entries(cfg.vision, cfg.scan_layers),
        *_expand(PROJECTOR, ("projector",), proj, "", [], 0, False),
        *text_entries(cfg.text, cfg.scan_layers),
    ]


def vision_entries(vision_cfg, scan: bool, root: tuple = ("vision",)) -> list[Entry]:
    """The CLIP tower's tensors (a VisionConfig); params under `root` (() for a bare ClipVisionModel)."""
    return _expand(VISION, root, CLIP_TOP, "encoder.layers.{i}.", CLIP_LAYER, vision_cfg.num_layers, scan)


def text_entries(text_cfg, scan: bool, root: tuple = ("llm",)) -> list[Entry]:
    """The LLaMA decoder's tensors incl. lm_head (a TextConfig); params under `root` (() for a LlamaModel)."""
    rows = _expand(LLM, root, LLAMA_TOP, "layers.{i}.", LLAMA_LAYER, text_cfg.num_layers, scan)
    return [*rows, Entry(LM_HEAD, (*root, "lm_head", "kernel"), None, "linear")]


def _expand(prefix, root, top, layer_prefix, rows, n, scan) -> list[Entry]:
    out = [Entry(prefix + hf, (*root, *ours.split(".")), None, t) for hf, ours, t in top]
    for hf, ours, t in rows:
        for i in range(n):
            key = prefix + layer_prefix.format(i=i) + hf
            if scan:
                out.append(Entry(key, (*root, "layers", *ours.split(".")), i, t))
            else:
                out.append(Entry(key, (*root, "layers", i, *ours.split(".")), None, t))
    return out


def lora_entries(weight_entry: Entry, module_key: str) -> tuple[Entry, Entry]:
    """A kept LoRA pair: PEFT lora_A [r, in] -> lora_a [in, r]; lora_B [out, r] -> lora_b [r, out]."""
    base = weight_entry.param[:-1]
    return (
        Entry(module_key + ".lora_A.weight", (*base, "lora_a"), weight_entry.layer, "linear"),
        Entry(module_key + ".lora_B.weight", (*base, "lora_b"), weight_entry.layer, "linear"),
    )


# ------------------------------------------------------------------------------------------------ transforms
# Each transform maps an HF (torch) tensor to our layout and back, one block of our leading axis ("rows")
# at a time: Linear [out, in] <-> kernel [in, out]; Conv2d [out, in, kh, kw] <-> [kh, kw, in, out].


def ours_shape(transform: str, hf_shape: tuple) -> tuple:
    if transform == "linear":
        return tuple(hf_shape[::-1]) if len(hf_shape) == 2 else tuple(hf_shape)
    if transform == "conv":
        return (hf_shape[2], hf_shape[3], hf_shape[1], hf_shape[0]) if len(hf_shape) == 4 else tuple(hf_shape)
    return tuple(hf_shape)


def hf_shape(transform: str, our_shape: tuple) -> tuple:
    if transform == "linear":
        return tuple(our_shape[::-1])
    if transform == "conv":
        return (our_shape[3], our_shape[2], our_shape[0], our_shape[1])
    return tuple(our_shape)


def to_ours(transform: str, w: Any, rows: slice) -> np.ndarray:
    """Rows `rows` of our layout from the HF-layout tensor `w` (a view where possible)."""
    if transform == "linear":
        return w[:, rows].T
    if transform == "conv":
        return w[:, :, rows].transpose(2, 3, 1, 0)
    return w[rows]


def put_hf(transform: str, out: Any, block: np.ndarray, rows: slice) -> None:
    """Writes `block` (rows `rows` of our layout) into the HF-layout array `out` (e.g. a file memmap)."""
    if transform == "linear":
        out[:, rows] = block.T
    elif transform == "conv":
        out[:, :, rows] = block.transpose(3, 2, 0, 1)
    else:
        out[rows] = block


def row_blocks(shape: tuple, itemsize: int, target_bytes: int) -> list[slice]:
    """Slices of the leading axis of an array of `shape`, each about `target_bytes` (at least one row)."""
    if not shape:
        return [slice(None)]
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    step = max(1, min(shape[0], target_bytes // max(row, 1)))
    return [slice(r, min(r + step, shape[0])) for r in range(0, shape[0], step)] or [slice(0, 0)]


def path_name(param: tuple) -> str:
    """Our param path as orbax names its array directory ('llm.layers.q_proj.kernel')."""
    return ".".join(map(str, param))
