"""Record -> fixed-shape arrays: image decoding, GeoChat image preprocessing, chat tokenization.

Image preprocessing is GeoChat's (geochat.md 1b): `expand2square` onto a (122, 116, 104) canvas, then
CLIPImageProcessor behaviour — resize the shortest edge to `image_size` (PIL bicubic on uint8), centre
crop, x/255, CLIP mean/std — giving float32 HWC. `pad_to_square=False` is what GeoChat's batch eval
scripts do (resize + crop only).
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rskd_jax.data import chat
from rskd_jax.data import tokenizer as tk
from rskd_jax.data.errors import DataError, log

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), as GeoChat's expand2square


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode: palette (with transparency), grey, grey+alpha, 1-bit, CMYK, 16/32-bit integer
    (scaled by 1/257, i.e. the top 8 of 16 bits) and float (clipped to [0, 255])."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        a = a / 257.0 if img.mode != "F" else a
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a path, encoded bytes, a PIL image or an array ([H, W], [H, W, 1|3|4]).

    Raises `DataError` naming the file for a missing, unreadable or corrupt image.
    """
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise DataError(f"image array of shape {image.shape} is not [H, W], [H, W, 1|3|4]")
        if a.dtype != np.uint8:
            raise DataError(f"image array of dtype {a.dtype}; expected uint8")
        return np.ascontiguousarray(
            np.broadcast_to(a, a.shape[:2] + (3,)) if a.shape[-1] == 1 else a[..., :3]
        )
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    what = _describe(image)
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            f = io.BytesIO(image)
        elif isinstance(image, (str, os.PathLike)):
            if not pathlib.Path(image).is_file():
                raise DataError(f"{what}: image file not found")
            f = open(image, "rb")  # pylint: disable=consider-using-with
        else:
            raise DataError(f"unsupported image value of type {type(image).__name__}")
        with f, Image.open(f) as img:
            img.load()  # decodes fully: truncated / corrupt data fails here
            return np.asarray(to_rgb(img))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what}: cannot decode image: {type(e).__name__}: {e}") from e


def expand2square(img: Image.Image, fill=PAD_COLOR) -> Image.Image:
    """Centres `img` on a square canvas of its longer side (GeoChat/LLaVA `expand2square`)."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, fill)
    canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def preprocess_image(image: np.ndarray, size: int, pad_to_square: bool = True) -> np.ndarray:
    """float32 [size, size, 3], CLIP-normalised, from uint8 RGB [H, W, 3]."""
    img = Image.fromarray(image)
    if pad_to_square:
        img = expand2square(img)
    w, h = img.size
    if (w, h) != (size, size):
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        w, h = img.size
        top, left = (h - size) // 2, (w - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, np.float32) * np.float32(1 / 255)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


class ExampleTransform:
    """Record (`image`, `conversations`, ...) -> one example of the batch contract (no batch axis):
    `pixel_values` f32 [S, S, 3]; `input_ids`, `attention_mask`, `loss_mask` i32 [max_len] (right-padded);
    `prompt_ids`, `prompt_mask` i32 [max_prompt_len] (left-padded).

    `tokenizer`: a tokenizer directory (loaded with `<image>` added) or a loaded HF tokenizer; only its ids
    and a picklable `TextEncoder` are kept, so worker processes do not import transformers.
    `stats` counts examples, truncations (`truncated`), earlier-round prompts (`prompt_fallback`) and
    examples left with no target (`no_target`) in this process; the 1st, 10th, 100th, ... of each is logged.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_size: int,
        image_seq_length: int,
        max_len: int,
        max_prompt_len: int,
        template: str = "vicuna_v1",
        pad_to_square: bool = True,
    ):
        tok = tk.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.ids = tk.special_ids(tok)
        self.encoder = tk.TextEncoder(tok)
        self.image_size, self.image_seq_length = image_size, image_seq_length
        self.max_len, self.max_prompt_len = max_len, max_prompt_len
        self.template = chat.get_template(template).name
        self.pad_to_square = pad_to_square
        self.stats = collections.Counter()
        if max_prompt_len > max_len:
            raise ValueError(f"max_prompt_len={max_prompt_len} > max_len={max_len}")

    def _count(self, key: str, where: str):
        self.stats[key] += 1
        n = self.stats[key]
        if n == 10 ** int(np.log10(n)):
            log.warning("%s: %s (%d so far in this process)", where, key, n)

    def encode_text(self, record: dict) -> chat.Encoded:
        """Token ids + loss mask of the record's conversation (no image decoding)."""
        where = str(record.get("id", "record"))
        msgs = chat.normalize_turns(record.get("conversations"), where)
        return chat.encode(
            msgs,
            self.template,
            self.encoder,
            image_token_id=self.ids.image,
            image_seq_length=self.image_seq_length,
            bos_id=self.ids.bos,
            eos_id=self.ids.eos,
            where=where,
        )

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        if not isinstance(record, dict) or "image" not in record:
            raise DataError(f"record without 'image': {record!r:.200}")
        where = str(record.get("id", _describe(record["image"])))
        fitted = chat.fit(
            self.encode_text(record),
            max_len=self.max_len,
            max_prompt_len=self.max_prompt_len,
            pad_id=self.ids.pad,
            image_token_id=self.ids.image,
            where=where,
        )
        pixels = preprocess_image(decode_image(record["image"]), self.image_size, self.pad_to_square)
        self.stats["examples"] += 1
        for key in ("truncated", "prompt_fallback", "no_target"):
            if getattr(fitted, key):
                self._count(key, where)
        return {"pixel_values": pixels, **fitted.arrays}


def length_report(source, transform: ExampleTransform, limit: int | None = None) -> dict[str, Any]:
    """Token-length statistics over a source (text only, no images) to choose `max_len`/`max_prompt_len`:
    counts of records that would be truncated or use an earlier-round prompt."""
    n = len(source) if limit is None else min(limit, len(source))
    lens, prompts = [], []
    for k in range(n):
        enc = transform.encode_text(source[k])
        lens.append(len(enc.ids))
        prompts.append(enc.prompt_ends[-1])
    lens, prompts = np.asarray(lens), np.asarray(prompts)
    return {
        "n": n,
        "max_len": int(lens.max()),
        "p99_len": float(np.percentile(lens, 99)),
        "max_prompt_len": int(prompts.max()),
        "truncated": int((lens > transform.max_len).sum()),
        "prompt_fallback": int((prompts > transform.max_prompt_len).sum()),
    }
