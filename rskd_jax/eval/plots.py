"""PNG figures: confusion matrix (paper Fig. 4), grounding boxes on images (Fig. 5), loss curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it is safe in
tests, worker processes and headless machines.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon
from PIL import Image

from rskd_jax.eval import boxes as boxlib


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


def plot_confusion(
    confusion,
    classes: Sequence[str],
    path,
    title: str | None = None,
    normalize: bool = True,
    annotate: bool | None = None,
) -> pathlib.Path:
    """Confusion matrix PNG, rows = true class, columns = predicted class.

    ``confusion`` is [C, C] or [C, C+1] (``metrics.scene_scores``: last column = answers matching no
    class, drawn as "(none)" only when non-zero). With ``normalize`` each row is divided by its total, so
    the diagonal shows per-class recall.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    c = len(classes)
    if conf.ndim != 2 or conf.shape[0] != c or conf.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion must be [{c}, {c}] or [{c}, {c + 1}] for {c} classes, got {conf.shape}")
    cols = list(classes)
    if conf.shape[1] == c + 1:
        if conf[:, c].sum() > 0:
            cols.append("(none)")
        else:
            conf = conf[:, :c]
    shown = conf / np.maximum(conf.sum(1, keepdims=True), 1) if normalize else conf
    size = max(5.0, 0.42 * len(cols) + 2.5)
    fig = Figure(figsize=(size, size * c / len(cols) + 0.6), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(c), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if annotate if annotate is not None else len(cols) <= 32:
        hi = shown.max() if shown.size else 0
        for i in range(c):
            for j in range(len(cols)):
                if conf[i, j]:
                    txt = f"{100 * shown[i, j]:.0f}" if normalize else f"{int(conf[i, j])}"
                    ax.text(
                        j,
                        i,
                        txt,
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if shown[i, j] > 0.6 * hi else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def _load_image(image) -> np.ndarray:
    if isinstance(image, (str, pathlib.Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image must be a path, PIL image or [H, W, 3] array, got shape {a.shape}")
    return a


def _draw_boxes(ax, items, w: float, h: float, color: str, style: str, label: str):
    scale = np.array([w / 100.0, h / 100.0])
    for k, b in enumerate(items):
        poly = boxlib.as_polygon(b) * scale
        ax.add_patch(
            Polygon(
                poly,
                closed=True,
                fill=False,
                edgecolor=color,
                linestyle=style,
                linewidth=2,
                label=label if k == 0 else None,
            )
        )


def plot_grounding(examples: Mapping | Sequence[Mapping], path, ncols: int = 4) -> pathlib.Path:
    """Predicted (red, dashed) vs ground-truth (green) boxes drawn on images, one panel per example.

    Each example: ``image`` (path, PIL image or [H, W, 3] array), ``pred`` (model text — parsed with
    ``boxes.parse_boxes`` — or a list of boxes), ``gt`` (list of boxes / 8-number polygons), optional
    ``title``. All boxes are on GeoChat's 0–100 grid and drawn rotated.
    """
    if isinstance(examples, Mapping):
        examples = [examples]
    if not examples:
        raise ValueError("plot_grounding: no examples")
    ncols = max(1, min(ncols, len(examples)))
    nrows = -(-len(examples) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows), dpi=100)
    for k, ex in enumerate(examples):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        img = _load_image(ex["image"])
        h, w = img.shape[:2]
        ax.imshow(img, extent=(0, w, h, 0))
        pred = ex.get("pred", [])
        pred = boxlib.parse_boxes(pred) if isinstance(pred, str) else list(pred)
        _draw_boxes(ax, ex.get("gt", []), w, h, "lime", "-", "ground truth")
        _draw_boxes(ax, pred, w, h, "red", "--", "prediction")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        if ex.get("title"):
            ax.set_title(str(ex["title"]), fontsize=8)
        if k == 0:
            ax.legend(loc="lower left", fontsize=6, framealpha=0.7)
    return _save(fig, path)


def plot_loss_curves(
    curves: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    path,
    title: str | None = None,
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
) -> pathlib.Path:
    """Line plot of named curves; each value is ``values`` (x = 0..n−1) or ``(steps, values)``."""
    if not curves:
        raise ValueError("plot_loss_curves: no curves")
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for name, c in curves.items():
        if isinstance(c, tuple) and len(c) == 2:
            x, y = np.asarray(c[0], dtype=np.float64), np.asarray(c[1], dtype=np.float64)
        else:
            y = np.asarray(c, dtype=np.float64)
            x = np.arange(len(y))
        if x.shape != y.shape:
            raise ValueError(f"curve {name!r}: {x.shape[0]} steps vs {y.shape[0]} values")
        ax.plot(x, y, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
