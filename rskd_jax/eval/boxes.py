"""GeoChat box strings and (rotated) box geometry, shapely-free.

GeoChat writes a box as ``{<x1><y1><x2><y2>|<θ>}``: left, top, right, bottom as integers on a 0–100 grid of
the image width/height, and θ an integer angle in degrees (several boxes are concatenated ``}{``; grounded
text wraps phrases as ``<p>phrase</p>{...}``). The paper never says how θ is defined (GeoChat issue #5);
we follow the demo's drawing code, which rotates the axis-aligned box about its centre with
``cv2.getRotationMatrix2D(centre, θ, 1)``: a corner offset ``(dx, dy)`` goes to
``(cos θ·dx + sin θ·dy, −sin θ·dx + cos θ·dy)`` — counter-clockwise on screen (y points down) for θ > 0.
Because the grid is normalised per axis, rotation happens in grid units; for square images (all GeoChat-Bench
grounding images) that equals rotating in pixels.

IoU of rotated boxes is exact: both boxes become convex polygons (convex hull of their corners, so the
corner order of ground-truth polygons does not matter), their intersection comes from Sutherland–Hodgman
clipping and the areas from the shoelace formula.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Box(NamedTuple):
    """A box on the 0–100 grid: left, top, right, bottom and a rotation angle in degrees (see module doc)."""

    x1: float
    y1: float
    x2: float
    y2: float
    angle: float = 0.0


_NUM = r"-?\d+(?:\.\d+)?"
_QUAD = re.compile(
    rf"<\s*({_NUM})\s*>\s*<\s*({_NUM})\s*>\s*<\s*({_NUM})\s*>\s*<\s*({_NUM})\s*>"
    rf"(?:\s*\|\s*<?\s*({_NUM})\s*>?)?"
)
_GROUP = re.compile(r"\{([^{}]*)\}")
_PHRASE = re.compile(r"<p>(.*?)</p>\s*((?:\{[^{}]*\}\s*)*)", re.S)


def _box_from_match(m: re.Match) -> Box:
    x1, y1, x2, y2 = (float(m.group(i)) for i in range(1, 5))
    angle = float(m.group(5)) if m.group(5) is not None else 0.0
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), angle)


def parse_boxes(text: str) -> list[Box]:
    """All well-formed boxes in a model output, in order; never raises.

    Inside each ``{...}`` group every ``<x1><y1><x2><y2>`` run (with an optional ``|<θ>`` or ``|θ``) is a
    box; groups with fewer than four numbers, unclosed groups (truncated generations) and non-numeric
    content are skipped. Text without any brace group is searched for bare ``<x1><y1><x2><y2>`` runs (the
    demo accepts those too). Swapped corners are put in left<right, top<bottom order.
    """
    if not isinstance(text, str):
        return []
    groups = _GROUP.findall(text)
    if not groups:
        return [_box_from_match(m) for m in _QUAD.finditer(text)]
    return [_box_from_match(m) for g in groups for m in _QUAD.finditer(g)]


def parse_grounded(text: str) -> list[tuple[str, list[Box]]]:
    """``<p>phrase</p>{box}{box}...`` segments as (phrase, boxes); a phrase without a valid box gets []."""
    if not isinstance(text, str):
        return []
    return [(m.group(1).strip(), parse_boxes(m.group(2) or "")) for m in _PHRASE.finditer(text)]


def format_box(box: Sequence[float], angle: float | None = None, with_angle: bool = True) -> str:
    """The GeoChat string ``{<x1><y1><x2><y2>|<θ>}`` of a 0–100 grid box; numbers are rounded to integers.

    ``angle`` defaults to the box's own 5th number, else 0; ``with_angle=False`` omits ``|<θ>``.
    """
    if len(box) not in (4, 5):
        raise ValueError(f"format_box: expected (x1, y1, x2, y2[, angle]), got {len(box)} numbers: {box!r}")
    if angle is None:
        angle = box[4] if len(box) == 5 else 0
    x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
    s = f"<{x1}><{y1}><{x2}><{y2}>"
    if with_angle:
        s += f"|<{int(round(float(angle)))}>"
    return "{" + s + "}"


# --------------------------------------------------------------------------------------- geometry


def box_polygon(box: Sequence[float]) -> np.ndarray:
    """The 4 corners [4, 2] of (x1, y1, x2, y2[, θ]) rotated about the centre by θ (cv2 convention)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    angle = float(box[4]) if len(box) > 4 else 0.0
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, abs(x2 - x1), abs(y2 - y1)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    d = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rot = np.array([[c, s], [-s, c]])
    return d @ rot.T + np.array([cx, cy])


def as_polygon(obj) -> np.ndarray:
    """Box / 4 numbers (axis-aligned) / 5 numbers (with θ) / 8 numbers or [4, 2] (polygon) -> [4, 2] float."""
    a = np.asarray(obj, dtype=np.float64)
    if a.shape == (4, 2):
        return a
    a = a.reshape(-1)
    if a.size in (4, 5):
        return box_polygon(a)
    if a.size == 8:
        return a.reshape(4, 2)
    raise ValueError(
        f"box must be 4 (x1,y1,x2,y2), 5 (+angle) or 8 numbers (4-point polygon), got shape {np.shape(obj)}"
    )


def polygon_to_hbb(poly) -> Box:
    """The axis-aligned box enclosing a polygon (what most GeoChat re-runs compare against)."""
    p = as_polygon(poly)
    return Box(*p.min(0), *p.max(0), 0.0)


def polygon_to_box(poly) -> Box:
    """A rotated rectangle's 4 corners (in order) -> the Box that ``box_polygon`` maps back to those corners.

    Width = |p1 − p0|, height = |p2 − p1|, θ = direction of the edge p0→p1 in the cv2 convention. For a
    quadrilateral that is not a rectangle this is an approximation; IoU code uses the polygon itself.
    """
    p = as_polygon(poly)
    c = p.mean(0)
    e1, e2 = p[1] - p[0], p[2] - p[1]
    w, h = float(np.hypot(*e1)), float(np.hypot(*e2))
    angle = math.degrees(math.atan2(-e1[1], e1[0]))
    return Box(c[0] - w / 2, c[1] - h / 2, c[0] + w / 2, c[1] + h / 2, angle)


def polygon_area(poly) -> float:
    """Unsigned shoelace area."""
    p = np.asarray(poly, dtype=np.float64)
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def convex_hull(points) -> np.ndarray:
    """Counter-clockwise (x right, y up) convex hull, Andrew's monotone chain; collinear points dropped."""
    pts = sorted({(float(x), float(y)) for x, y in np.asarray(points, dtype=np.float64)})
    if len(pts) <= 2:
        return np.array(pts, dtype=np.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman: the part of convex ``subject`` inside convex ``clip`` (both counter-clockwise)."""
    out = [tuple(p) for p in subject]
    for i in range(len(clip)):
        if not out:
            break
        a, b = clip[i], clip[(i + 1) % len(clip)]
        ex, ey = b[0] - a[0], b[1] - a[1]

        def side(p, a=a, ex=ex, ey=ey):  # > 0: left of a->b, i.e. inside for a counter-clockwise clip
            return ex * (p[1] - a[1]) - ey * (p[0] - a[0])

        inp, out = out, []
        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            sp, sq = side(p), side(q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def iou(a, b, rotated: bool = True) -> float:
    """IoU of two boxes/polygons (see ``as_polygon``). ``rotated=False`` compares the enclosing axis-aligned
    boxes instead (angles and polygon shape ignored). Degenerate (zero-area) inputs give 0."""
    if not rotated:
        (ax1, ay1, ax2, ay2, _), (bx1, by1, bx2, by2, _) = polygon_to_hbb(a), polygon_to_hbb(b)
        inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        return float(inter / union) if union > 0 else 0.0
    pa, pb = convex_hull(as_polygon(a)), convex_hull(as_polygon(b))
    area_a, area_b = polygon_area(pa), polygon_area(pb)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = polygon_area(clip_convex(pa, pb))
    union = area_a + area_b - inter
    return float(min(1.0, max(0.0, inter / union))) if union > 0 else 0.0


def iou_matrix(preds: Sequence, gts: Sequence, rotated: bool = True) -> np.ndarray:
    """[len(gts), len(preds)] IoU matrix."""
    m = np.zeros((len(gts), len(preds)))
    for i, g in enumerate(gts):
        for j, p in enumerate(preds):
            m[i, j] = iou(p, g, rotated=rotated)
    return m


def scale_polygon(poly, image_size: tuple[float, float]) -> np.ndarray:
    """Pixel coordinates (GeoChat-Bench ground-truth polygons) -> 0–100 grid; image_size = (width, height)."""
    w, h = image_size
    return as_polygon(poly) * np.array([100.0 / w, 100.0 / h])
