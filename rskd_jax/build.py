"""The one model builder: a config section (preset + sizes + overrides [+ checkpoint]) -> LlavaConfig -> a
LlavaModel whose parameters are created or loaded directly in their sharding on the mesh.

Training (`rskd_jax.train.run`), the AOT plan (`rskd_jax.train.plan`) and evaluation read model configs here, so
the plan compiles the program training runs. A config section (configs/distill.py `model_section`) holds:
    preset        a name from rskd_jax.models.presets (architecture)
    vision, text  size fields replacing the preset's (tests and rehearsals shrink the real presets this way)
    overrides     LlavaConfig fields: numerics and layout (dtype, param_dtype, remat_policy, attention_impl, ...)
    checkpoint    optional: our checkpoint or anything `rskd-convert import` reads (converted on the fly);
                  checkpoint_format / vision_tower / mm_projector as for the converter

With a checkpoint, its architecture must equal what the section describes (else one clear error naming the
checkpoint and the field), and the tokenizer must fit its vocabulary, checked before any device memory is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
from flax import nnx

from rskd_jax.convert import ckpt, importer
from rskd_jax.convert.errors import ConversionError
from rskd_jax.models import LlavaModel, get_preset
from rskd_jax.models.presets import LlavaConfig
from rskd_jax.parallel import rules
from rskd_jax.pretrained import load_pretrained

log = logging.getLogger(__name__)

VISION_ARCH = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size")
TEXT_ARCH = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
VOCAB_SLACK = 256  # rows a checkpoint's vocabulary may have beyond its tokenizer (LLaVA pads 32002 -> 32064)


class ModelConfigError(ValueError):
    """A checkpoint or tokenizer that does not fit the config section naming it."""


def model_config(config, section, ids=None) -> LlavaConfig:
    """The LlavaConfig that `section` of `config` describes.

    ids: the run tokenizer's SpecialIds (vocab size, <image>, BOS, EOS, pad); without them the 'tiny' preset
    gets `data.vocab_size` (what the demo trains its tokenizer to) and real presets keep theirs.
    """
    base = get_preset(section.preset)
    vision_kw = dict(section.vision)
    size = vision_kw.pop("image_size", config.data.image_size)
    if size != config.data.image_size:
        raise ModelConfigError(
            f"config vision.image_size={size} differs from data.image_size={config.data.image_size}: the data's "
            "image size is the model's (set data.image_size only)"
        )
    vision = dataclasses.replace(base.vision, image_size=config.data.image_size, **vision_kw)
    text_kw = dict(section.text)
    special = {}
    if ids is not None:
        text_kw.setdefault("vocab_size", ids.vocab_size if section.preset == "tiny" else base.text.vocab_size)
        special = dict(
            image_token_id=ids.image, pad_token_id=ids.pad, bos_token_id=ids.bos, eos_token_id=ids.eos
        )
    elif section.preset == "tiny":
        text_kw.setdefault("vocab_size", int(config.data.vocab_size))
    text = dataclasses.replace(base.text, **text_kw)
    return base.replace(vision=vision, text=text, **special, **dict(section.overrides))


def source_kwargs(section, image_size: int) -> dict:
    """Converter arguments of a section's checkpoint (format and separate parts of original layouts)."""
    opt = lambda k: section.get(k) or None  # noqa: E731
    return dict(
        fmt=section.get("checkpoint_format") or "auto",
        vision_tower=opt("vision_tower"),
        mm_projector=opt("mm_projector"),
        image_size=image_size,
    )


def checkpoint_config(
    path, *, fmt="auto", vision_tower=None, mm_projector=None, image_size=None
) -> LlavaConfig:
    """The architecture stored in a checkpoint, read from its metadata only (no weights are read)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if ckpt.is_checkpoint(path):
        return LlavaConfig.from_dict(json.loads((path / ckpt.CONFIG).read_text()))
    source = importer.open_source(
        path, fmt, vision_tower=vision_tower, mm_projector=mm_projector, image_size=image_size
    )
    return source.cfg


def check_against(saved: LlavaConfig, want: LlavaConfig, where: str, section_name: str) -> None:
    """Raises ModelConfigError naming the first architecture field where the checkpoint differs."""
    diffs = [
        f"{section_name}.vision.{f}: config {getattr(want.vision, f)}, checkpoint {getattr(saved.vision, f)}"
        for f in VISION_ARCH
        if getattr(want.vision, f) != getattr(saved.vision, f)
    ] + [
        f"{section_name}.text.{f}: config {getattr(want.text, f)}, checkpoint {getattr(saved.text, f)}"
        for f in TEXT_ARCH
        if getattr(want.text, f) != getattr(saved.text, f)
    ]
    if diffs:
        raise ModelConfigError(
            f"{where}: checkpoint shapes do not match config section '{section_name}': " + "; ".join(diffs)
        )


def check_vocab(saved: LlavaConfig, ids, where: str, tokenizer_dir) -> None:
    """The tokenizer's ids must index the checkpoint's embedding (the <image> placeholder may lie outside)."""
    n_text = ids.vocab_size - (1 if ids.image >= saved.text.vocab_size else 0)
    if n_text > saved.text.vocab_size or saved.text.vocab_size - n_text > VOCAB_SLACK:
        raise ModelConfigError(
            f"{where}: vocabulary of {saved.text.vocab_size} rows does not match tokenizer {tokenizer_dir} "
            f"({ids.vocab_size} tokens, <image> = {ids.image}); give config data.tokenizer = the tokenizer "
            "saved with this checkpoint"
        )


def resolve(config, section, section_name: str, ids=None, tokenizer_dir=None) -> LlavaConfig:
    """The config a section builds: the checkpoint's architecture (checked against the section) with the
    section's numerics and the tokenizer's special ids, or the section's own config for a random init."""
    want = model_config(config, section, ids)
    if not section.checkpoint:
        return want
    kw = source_kwargs(section, config.data.image_size)
    try:
        saved = checkpoint_config(section.checkpoint, **kw)
    except ConversionError as e:
        raise ModelConfigError(f"config {section_name}.checkpoint: {e}") from e
    check_against(saved, want, str(section.checkpoint), section_name)
    if ids is not None:
        check_vocab(saved, ids, str(section.checkpoint), tokenizer_dir)
    layout = {f.name: getattr(want, f.name) for f in dataclasses.fields(LlavaConfig)}
    for k in ("vision", "text", "projector_type", "vision_feature_layer", "select_strategy"):
        layout.pop(k)
    if ids is None:
        for k in ("image_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            layout.pop(k)
    return saved.replace(**layout)


def build_model(
    config, section, section_name: str, *, mesh, seed: int, ids=None, tokenizer_dir=None
) -> LlavaModel:
    """The model `section` names, its parameters created or loaded in their sharding on `mesh`."""
    cfg = resolve(config, section, section_name, ids, tokenizer_dir)
    if not section.checkpoint:  # no active mesh here: nnx would read the logical axis names as mesh axes
        return rules.init_sharded(lambda: LlavaModel(cfg, rngs=nnx.Rngs(seed)), mesh)

    kw = source_kwargs(section, config.data.image_size)
    skip = ("vision", "text", "param_dtype", "dtype", "scan_layers")
    over = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    model, _ = load_pretrained(
        section.checkpoint,
        dtype=cfg.param_dtype,
        compute_dtype=cfg.dtype,
        scan_layers=cfg.scan_layers,
        mesh=mesh,
        **kw,
        **over,
    )
    return model


def device_bytes(tree) -> tuple[int, int]:
    """(largest bytes on one device, total bytes) of the jax.Arrays in `tree` (this process's devices)."""
    per: dict = {}
    total = 0
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):
            continue
        total += x.size * x.dtype.itemsize
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + int(np.prod(s.data.shape)) * x.dtype.itemsize
    return (max(per.values()) if per else 0), total
