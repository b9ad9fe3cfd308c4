"""Source checkpoints: detect the format, read the config, and name every tensor by its canonical key.

Formats:
* `hf-llava`: an HF LlavaForConditionalGeneration directory in any of its three key layouts.
* `llava` / `geochat`: an original LLaVA / GeoChat checkpoint (`model.layers.*`, `model.mm_projector.0/2`,
  `model.vision_tower.vision_tower.vision_model.*`, `mm_*` config fields). `geochat` only changes the default
  image size to 504 (GeoChat's 1297-row position table, interpolated at conversion).
* `parts`: a LLaMA/Vicuna directory (SRC) + a CLIP vision directory (`vision_tower`) + an `mm_projector.bin`.

`vision_tower` (a CLIP directory) replaces the checkpoint's own vision tower in every format; the replaced
tensors are listed as ignored.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from rskd_jax.convert import hfconfig
from rskd_jax.convert.ckpt import is_checkpoint
from rskd_jax.convert.errors import ConversionError
from rskd_jax.convert.files import TensorRef, WeightSet
from rskd_jax.convert.keymap import EXTRAS, IGNORED, PROJECTOR, VISION, canonical_key
from rskd_jax.models.presets import LlavaConfig

FORMATS = ("auto", "hf-llava", "llava", "geochat", "parts")
GEOCHAT_IMAGE_SIZE = 504
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass
class Source:
    """A source checkpoint, read from headers only. `refs` are keyed canonically; `origin` gives the original
    'file: key' of each for messages; `unexpected` are source keys that match no layout rule."""

    format: str
    cfg: LlavaConfig
    refs: dict[str, TensorRef]
    origin: dict[str, str]
    unexpected: list[str]
    ignored: list[str]
    layout: str  # key layout of the main checkpoint (for LoRA module names)
    tokenizer_dir: pathlib.Path | None
    image_token_from_tokenizer: bool  # original LLaVA has no image token id: take it from the tokenizer


def _collect(ws: WeightSet, layout: str, out: Source, drop: re.Pattern | None = None) -> None:
    extras = EXTRAS.get(layout)
    for key, ref in ws.refs.items():
        where = f"{ref.file.name}: {key}"
        if IGNORED.search(key) or (extras is not None and extras.match(key)):
            out.ignored.append(where)
            continue
        canon = canonical_key(key, layout)
        if canon is None:
            out.unexpected.append(where)
        elif drop is not None and drop.match(canon):
            out.ignored.append(f"{where} (superseded by --vision-tower)")
        elif canon in out.refs:
            raise ConversionError(f"two tensors map to {canon}: {out.origin[canon]} and {where}")
        else:
            out.refs[canon], out.origin[canon] = ref, where


def _has_tokenizer(d: pathlib.Path | None) -> bool:
    return d is not None and any((d / f).is_file() for f in TOKENIZER_FILES)


def detect_format(src: pathlib.Path, config: dict, keys: list[str]) -> str:
    """'hf-llava' | 'llava' | 'geochat' | 'llama' (a plain LLaMA dir, usable as the LLM of `parts`)."""
    if any(re.match(r"^(model\.)?mm_projector\.", k) for k in keys) or hfconfig.is_original_llava(config):
        return "geochat" if hfconfig.is_geochat(config) else "llava"
    if any(re.match(r"^(model\.)?multi_modal_projector\.", k) for k in keys) or (
        config.get("model_type") == "llava" and "vision_config" in config
    ):
        return "hf-llava"
    if config.get("model_type") == "llama" or (
        keys and all(re.match(r"^(model\.|lm_head\.)", k) for k in keys)
    ):
        return "llama"
    head = ", ".join(sorted(keys)[:5])
    raise ConversionError(
        f"{src}: unknown checkpoint format (config model_type={config.get('model_type')!r}, architectures="
        f"{config.get('architectures')!r}; first tensors: {head or 'none'}). Expected an HF Llava, an "
        "original "
        "LLaVA/GeoChat or a LLaMA directory (with --format parts)"
    )


def open_source(
    src: str | pathlib.Path,
    fmt: str = "auto",
    *,
    vision_tower: str | pathlib.Path | None = None,
    mm_projector: str | pathlib.Path | None = None,
    image_size: int | None = None,
) -> Source:
    """Opens SRC (+ parts) and returns its Source. Raises ConversionError for anything unreadable."""
    src = pathlib.Path(src)
    _refuse_non_sources(src, fmt)
    config = hfconfig.read_json(src / "config.json") if (src / "config.json").is_file() else {}
    main = WeightSet(src)
    fmt = _resolve_format(src, fmt, detect_format(src, config, list(main.refs)), vision_tower, mm_projector)
    where = str(src / "config.json")
    layout = {"hf-llava": "hf-llava", "llava": "llava", "geochat": "llava", "parts": "llama"}[fmt]
    out = Source(fmt, None, {}, {}, [], [], layout, src if _has_tokenizer(src) else None, fmt != "hf-llava")
    drop = re.compile(re.escape(VISION)) if vision_tower is not None else None
    _collect(main, layout, out, drop)

    vision_cfg = None
    if vision_tower is not None:
        vt = pathlib.Path(vision_tower)
        vision_cfg = hfconfig.vision_config(hfconfig.read_json(vt / "config.json"), str(vt / "config.json"))
        _collect(WeightSet(vt), "clip", out)
    if fmt == "parts":
        config = _collect_projector(out, config, vision_tower, mm_projector)

    if fmt == "hf-llava":
        cfg = hfconfig.llava_config(config, where)
        if vision_cfg is not None:
            cfg = cfg.replace(vision=vision_cfg)
    else:
        if vision_cfg is None:
            shapes = {k: r.info.shape for k, r in out.refs.items() if k.startswith(VISION)}
            if not shapes:
                raise ConversionError(
                    f"{src}: the checkpoint has no vision tower weights; pass --vision-tower CLIP_DIR "
                    f"(e.g. {config.get('mm_vision_tower') or 'openai/clip-vit-large-patch14-336'})"
                )
            vision_cfg = hfconfig.vision_from_shapes(shapes, VISION, str(src))
        cfg = hfconfig.original_llava_config(config, vision_cfg, config.get("vocab_size", 32000), where)
    if image_size is None and fmt == "geochat":
        image_size = GEOCHAT_IMAGE_SIZE
    if image_size is not None:
        if image_size % cfg.vision.patch_size:
            raise ConversionError(
                f"--image-size {image_size} is not a multiple of the patch size {cfg.vision.patch_size}"
            )
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=image_size))
    out.cfg = cfg
    return out


def _refuse_non_sources(src: pathlib.Path, fmt: str) -> None:
    """ConversionError unless `src` is a directory holding a convertible checkpoint and `fmt` a known format."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown --format {fmt!r}; expected one of {FORMATS}")
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if is_checkpoint(src):
        raise ConversionError(f"{src}: already an rskd-jax checkpoint (load it with load_pretrained)")
    if (src / "adapter_config.json").is_file():
        raise ConversionError(
            f"{src}: a LoRA adapter; give the base model as SRC and the adapter with --lora"
        )


def _resolve_format(src, fmt: str, detected: str, vision_tower, mm_projector) -> str:
    """The format to convert with: the detected one for `auto` (a plain LLaMA needs its parts), else `fmt`
    when it agrees with what was detected."""
    if fmt == "auto":
        if detected != "llama":
            return detected
        if vision_tower is None or mm_projector is None:
            raise ConversionError(
                f"{src}: a plain LLaMA checkpoint; convert it with --format parts, "
                "--vision-tower CLIP_DIR and --mm-projector mm_projector.bin"
            )
        return "parts"
    if {fmt, detected} not in ({"llava", "geochat"}, {fmt}) and not (fmt == "parts" and detected == "llama"):
        raise ConversionError(f"{src}: --format {fmt} given, but the checkpoint looks like {detected}")
    return fmt


def _collect_projector(out: Source, config: dict, vision_tower, mm_projector) -> dict:
    """`--format parts`: reads the separate mm_projector into `out`; -> `config` with the projector's `mm_*`
    settings (its config.json, else the defaults for the projector found)."""
    if vision_tower is None or mm_projector is None:
        raise ConversionError("--format parts needs --vision-tower CLIP_DIR and --mm-projector FILE")
    proj = pathlib.Path(mm_projector)
    proj_file = proj / "mm_projector.bin" if proj.is_dir() else proj
    mm_cfg = (
        hfconfig.read_json(proj / "config.json") if proj.is_dir() and (proj / "config.json").is_file() else {}
    )
    _collect(WeightSet(proj_file), "projector", out)
    kind = "mlp2x_gelu" if PROJECTOR + "linear_2.weight" in out.refs else "linear"
    config = {**config, **{k: v for k, v in mm_cfg.items() if k.startswith("mm_")}}
    config.setdefault("mm_projector_type", kind)
    config.setdefault("mm_vision_select_layer", -2)
    return config
