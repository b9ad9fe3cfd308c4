"""GeoChat boxes of an answer drawn onto the image (rotated where θ ≠ 0), as GeoChat's demo shows them.

Boxes are on a 0–100 grid of the image width / height (`rskd_jax.eval.boxes`); the demo scales them to the
picture the same way (`bounding_box_size = 100`). Grounded phrases (`<p>phrase</p>{...}`) label their boxes.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image, ImageDraw

from rskd_jax.eval.boxes import Box, box_polygon, parse_boxes, parse_grounded

COLORS = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (80, 255, 120), (255, 96, 255), (255, 150, 40))


def labelled_boxes(text: str) -> list[tuple[str, Box]]:
    """(label, box) of every box in an answer: grounded phrases label theirs, other boxes get ""."""
    out = [(phrase, b) for phrase, bs in parse_grounded(text) for b in bs]
    if not out:
        out = [("", b) for b in parse_boxes(text)]
    return out


def draw_boxes(image: np.ndarray, text: str, scale: int = 0) -> Image.Image | None:
    """The image (uint8 [H, W, 3]) with the answer's boxes drawn on it, or None if the answer has none.

    scale: draw on a copy enlarged to at least this many pixels on the short side (small images stay legible).
    """
    items = labelled_boxes(text)
    if not items:
        return None
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    if scale and min(img.size) < scale:
        f = scale / min(img.size)
        img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.BICUBIC)
    w, h = img.size
    pen = ImageDraw.Draw(img)
    width = max(2, round(min(w, h) / 150))
    for k, (label, box) in enumerate(items):
        color = COLORS[k % len(COLORS)]
        corners = [(float(x) * w / 100, float(y) * h / 100) for x, y in box_polygon(box)]
        pen.line(corners + corners[:1], fill=color, width=width, joint="curve")
        if label:
            x, y = min(corners, key=lambda p: p[1])  # above the top corner
            pen.text((x + width, max(0.0, y - 12)), label, fill=color)
    return img


def save_boxes(image: np.ndarray, text: str, path: str | pathlib.Path, scale: int = 0) -> pathlib.Path | None:
    """`draw_boxes` written as a PNG at `path` (folders created); None (nothing written) without boxes."""
    img = draw_boxes(image, text, scale)
    if img is None:
        return None
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
