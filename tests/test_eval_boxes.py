"""GeoChat box strings and IoU: closed forms written out here (axis-aligned boxes, concentric squares at any
angle), hand-computed cases and a rasterised (matplotlib Path) reference."""

import math

import numpy as np
import pytest
from matplotlib.path import Path

from rskd_jax.eval import boxes as B


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{<16><55><24><63>|<11>}", [(16, 55, 24, 63, 11)]),
        ("{<16><55><24><63>|<11>}{<8><82><16><90>|<69>}", [(16, 55, 24, 63, 11), (8, 82, 16, 90, 69)]),
        ("There is a <p>plane</p> {<16><55><24><63>|<11>} on the runway.", [(16, 55, 24, 63, 11)]),
        ("{<1><2><3><4>}", [(1, 2, 3, 4, 0)]),  # no angle -> 0
        ("{<1><2><3><4>|11}", [(1, 2, 3, 4, 11)]),  # bare angle
        ("{ <1> <2> <3> <4> | <-30> }", [(1, 2, 3, 4, -30)]),  # spaces, negative angle
        ("{<60><70><40><50>|<5>}", [(40, 50, 60, 70, 5)]),  # swapped corners are ordered
        ("{<12.5><2><30><4.25>|<0>}", [(12.5, 2, 30, 4.25, 0)]),
        ("<1><2><3><4>", [(1, 2, 3, 4, 0)]),  # bare run, no braces (the demo accepts it)
        # malformed: too few numbers, non-numbers, unclosed (truncated generation), empty, none at all
        ("{<1><2><3>}", []),
        ("{<a><b><c><d>|<e>}", []),
        ("{<1><2><3><4>|<5>}{<6><7><8>", [(1, 2, 3, 4, 5)]),
        ("{<1><2><3>", []),
        ("", []),
        ("I cannot find it.", []),
        (None, []),
    ],
)
def test_parse_boxes(text, expected):
    got = B.parse_boxes(text)
    assert [tuple(b) for b in got] == [tuple(float(x) for x in e) for e in expected]


def test_parse_grounded_and_format_roundtrip():
    text = "Two <p>planes</p>{<16><55><24><63>|<11>}{<8><82><16><90>|<69>} near a <p>runway</p>{<1><2><3>}."
    got = B.parse_grounded(text)
    assert [p for p, _ in got] == ["planes", "runway"]
    assert [tuple(b) for b in got[0][1]] == [(16, 55, 24, 63, 11), (8, 82, 16, 90, 69)]
    assert got[1][1] == []
    assert B.format_box((16, 55, 24, 63), 11) == "{<16><55><24><63>|<11>}"
    assert B.format_box((16.4, 54.6, 24, 63, -7)) == "{<16><55><24><63>|<-7>}"
    assert B.format_box((1, 2, 3, 4), with_angle=False) == "{<1><2><3><4>}"
    assert B.parse_boxes(B.format_box((16, 55, 24, 63, 11))) == [B.Box(16, 55, 24, 63, 11)]
    with pytest.raises(ValueError, match="expected"):
        B.format_box((1, 2, 3))


def test_axis_aligned_iou_by_hand():
    assert B.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert B.iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert B.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edge
    assert B.iou((0, 0, 10, 10), (30, 30, 40, 40)) == 0.0
    assert B.iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # degenerate
    for rotated in (True, False):  # both code paths agree on axis-aligned boxes
        assert B.iou((0, 0, 10, 20), (5, 10, 25, 40), rotated=rotated) == pytest.approx(50 / (200 + 600 - 50))


def test_rotated_iou_by_hand():
    # Square [40,60]^2 rotated 45° vs itself unrotated (IoU is scale-free, so take side 2 about 0): the
    # rotated square |x|+|y| <= √2 cuts 4 corner triangles with legs 2 − √2 off [-1,1]^2, so
    # I = 4 − 4·(2 − √2)²/2 = 8√2 − 8 and IoU = I / (4 + 4 − I) = 1/√2.
    assert B.iou((40, 40, 60, 60, 45), (40, 40, 60, 60, 0)) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # 20×10 rectangle rotated 90° is the 10×20 rectangle with the same centre.
    assert B.iou((40, 45, 60, 55, 90), (45, 40, 55, 60, 0)) == pytest.approx(1.0, abs=1e-12)
    # ... and overlaps its unrotated self in a 10×10 square: 100 / (200 + 200 − 100).
    assert B.iou((40, 45, 60, 55, 90), (40, 45, 60, 55, 0)) == pytest.approx(1 / 3, abs=1e-12)
    # HBB protocol: the 45° square's enclosing box has side 20√2 -> IoU with the square = 400 / 800.
    assert B.iou((40, 40, 60, 60, 45), (40, 40, 60, 60, 0), rotated=False) == pytest.approx(0.5, abs=1e-12)


def _aabb_iou(a, b):
    """Closed form for axis-aligned boxes: overlap widths times heights over the union."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_axis_aligned_iou_matches_the_closed_form():
    rng = np.random.default_rng(3)
    boxes = [(*lo, *(lo + wh)) for lo, wh in zip(rng.uniform(0, 60, (40, 2)), rng.uniform(1, 40, (40, 2)))]
    got = B.iou_matrix(boxes, boxes)  # rotated polygons at angle 0
    hbb = B.iou_matrix(boxes, boxes, rotated=False)
    want = np.array([[_aabb_iou(g, p) for p in boxes] for g in boxes])
    assert (want > 0).sum() > 200 and (want == 0).sum() > 200  # overlapping and disjoint pairs both covered
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hbb, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("theta", [1.0, 10.0, 30.0, 45.0, 60.0, 89.0, -20.0])
def test_concentric_squares_iou_matches_the_closed_form(theta):
    """[-1, 1]² and itself rotated by θ: the rotated edge x·cos θ + y·sin θ = 1 cuts a right triangle with
    legs a = 1 − (1 − sin θ)/cos θ and b = 1 − (1 − cos θ)/sin θ off each corner, so the overlap is
    I = 4 − 2ab and IoU = I / (8 − I) (θ = 45° gives the hand case above, 1/√2). IoU is scale-free, and
    symmetric in ±θ."""
    t = math.radians(abs(theta))
    a = 1 - (1 - math.sin(t)) / math.cos(t)
    b = 1 - (1 - math.cos(t)) / math.sin(t)
    inter = 4 - 2 * a * b
    want = inter / (8 - inter)
    assert B.iou((40, 40, 60, 60, theta), (40, 40, 60, 60, 0)) == pytest.approx(want, rel=1e-12)
    assert B.iou((40, 40, 60, 60, 0), (40, 40, 60, 60, theta)) == pytest.approx(want, rel=1e-12)


def test_iou_matrix_shapes_and_empty_inputs():
    assert B.iou_matrix([], [(0, 0, 1, 1)]).shape == (1, 0)
    assert B.iou_matrix([(0, 0, 1, 1)], []).shape == (0, 1)
    m = B.iou_matrix([(0, 0, 10, 10), (0, 0, 0, 10)], [(0, 0, 10, 10), (5, 0, 15, 10), (0, 0, 10, 10, 45)])
    assert m.shape == (3, 2) and (m[:, 1] == 0).all()  # a zero-area prediction overlaps nothing
    assert m[0, 0] == 1.0 and m[1, 0] == pytest.approx(50 / 150)


def test_rotation_direction_follows_cv2():
    # cv2.getRotationMatrix2D(c, 90, 1) maps an offset (dx, dy) to (dy, -dx): the right edge midpoint
    # moves to the top (counter-clockwise on screen, y down).
    poly = B.box_polygon((-1, -1, 1, 1, 90))
    assert np.allclose(poly, [[-1, 1], [-1, -1], [1, -1], [1, 1]])
    p = B.box_polygon((0, 0, 4, 2, 30))
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert np.allclose(p[1], [2 + c * 2 + s * -1, 1 - s * 2 + c * -1])  # corner (+w/2, -h/2)


def _shoelace(poly):
    x, y = np.asarray(poly, dtype=np.float64).T
    return abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2


def _raster_iou(a, b, n=600):
    xs = (np.arange(n) + 0.5) / n * 100
    pts = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    ia, ib = Path(B.as_polygon(a)).contains_points(pts), Path(B.as_polygon(b)).contains_points(pts)
    return (ia & ib).sum() / (ia | ib).sum()


def test_rotated_iou_matches_rasterised_reference():
    rng = np.random.default_rng(0)
    for _ in range(6):
        c = rng.uniform(35, 65, (2, 2))
        wh = rng.uniform(10, 30, (2, 2))
        ang = rng.uniform(-90, 90, 2)
        a = (*(c[0] - wh[0] / 2), *(c[0] + wh[0] / 2), ang[0])
        b = (*(c[1] - wh[1] / 2), *(c[1] + wh[1] / 2), ang[1])
        assert B.iou(a, b) == pytest.approx(_raster_iou(a, b), abs=0.01)


def test_polygons_pixels_and_conversions():
    rng = np.random.default_rng(1)
    for _ in range(5):
        box = B.Box(*rng.uniform(0, 40, 2), *rng.uniform(60, 100, 2), rng.uniform(-179, 179))
        back = B.polygon_to_box(B.box_polygon(box))
        assert np.allclose(back, box, atol=1e-9)
    poly = B.box_polygon((10, 20, 30, 60, 25))
    assert _shoelace(poly) == pytest.approx(20 * 40)
    # corner order does not matter (convex hull), 8-number form == [4, 2] form
    shuffled = poly[[0, 2, 1, 3]]
    assert B.iou(shuffled.reshape(-1), (10, 20, 30, 60, 25)) == pytest.approx(1.0)
    hbb = B.polygon_to_hbb([0, 0, 10, 0, 10, 5, 0, 5])
    assert tuple(hbb) == (0, 0, 10, 5, 0)
    # pixel polygon of a 1024 px image -> 0-100 grid
    assert np.allclose(
        B.scale_polygon([0, 0, 512, 0, 512, 256, 0, 256], (1024, 1024)), [[0, 0], [50, 0], [50, 25], [0, 25]]
    )
    with pytest.raises(ValueError, match="4 .*5 .*8"):
        B.as_polygon([1, 2, 3])
    assert B.iou_matrix([(0, 0, 10, 10)], [(0, 0, 10, 10), (5, 0, 15, 10)]).shape == (2, 1)
