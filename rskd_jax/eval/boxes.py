"""GeoChat box strings and (rotated) box geometry; IoU through shapely.

GeoChat writes a box as ``{<x1><y1><x2><y2>|<θ>}``: left, top, right, bottom as integers on a 0–100 grid of
the image width/height, and θ an integer angle in degrees (several boxes are concatenated ``}{``; grounded
text wraps phrases as ``<p>phrase</p>{...}``). The paper never says how θ is defined (GeoChat issue #5);
we follow the demo's drawing code, which rotates the axis-aligned box about its centre with
``cv2.getRotationMatrix2D(centre, θ, 1)``: a corner offset ``(dx, dy)`` goes to
``(cos θ·dx + sin θ·dy, −sin θ·dx + cos θ·dy)`` — counter-clockwise on screen (y points down) for θ > 0.
Because the grid is normalised per axis, rotation happens in grid units; for square images (all GeoChat-Bench
grounding images) that equals rotating in pixels.

IoU of rotated boxes is exact: both boxes become convex polygons (the convex hull of their corners, so the
corner order of ground-truth polygons does not matter) whose intersection and areas shapely (GEOS) computes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import shapely


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


def _shapes(objs: Sequence, rotated: bool) -> np.ndarray:
    """shapely polygons: the convex hull of each box's corners (rotated), or its enclosing axis-aligned box."""
    if rotated:
        shapes = [shapely.convex_hull(shapely.multipoints(as_polygon(o))) for o in objs]
    else:
        shapes = [shapely.box(*polygon_to_hbb(o)[:4]) for o in objs]
    out = np.empty(len(shapes), dtype=object)
    out[:] = shapes
    return out


def iou_matrix(preds: Sequence, gts: Sequence, rotated: bool = True) -> np.ndarray:
    """[len(gts), len(preds)] IoU matrix of boxes / polygons (see ``as_polygon``). ``rotated=False`` compares
    the enclosing axis-aligned boxes instead (angles and polygon shape ignored). Degenerate (zero-area) boxes
    give 0."""
    g, p = _shapes(gts, rotated), _shapes(preds, rotated)
    if not len(g) or not len(p):
        return np.zeros((len(g), len(p)))
    inter = shapely.area(shapely.intersection(g[:, None], p[None, :]))
    area_g, area_p = shapely.area(g)[:, None], shapely.area(p)[None, :]
    union = area_g + area_p - inter
    ok = (area_g > 0) & (area_p > 0) & (union > 0)
    return np.where(ok, np.clip(inter / np.where(ok, union, 1.0), 0.0, 1.0), 0.0)


def iou(a, b, rotated: bool = True) -> float:
    """IoU of two boxes / polygons; see ``iou_matrix``."""
    return float(iou_matrix([a], [b], rotated=rotated)[0, 0])


def scale_polygon(poly, image_size: tuple[float, float]) -> np.ndarray:
    """Pixel coordinates (GeoChat-Bench ground-truth polygons) -> 0–100 grid; image_size = (width, height)."""
    w, h = image_size
    return as_polygon(poly) * np.array([100.0 / w, 100.0 / h])
