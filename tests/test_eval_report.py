"""Reports (JSON + Markdown in the paper's layout) and PNG figures (checked with PIL)."""

import json

import numpy as np
import pytest
from PIL import Image

from rskd_jax.eval import metrics as M
from rskd_jax.eval import plots, report


def _model_results(shift: int):
    """Metrics of a fake model whose answers get better with ``shift`` (0, 1, 2)."""
    classes = ["beach", "river", "forest"]
    gts = ["beach", "river", "forest"] * 4
    preds = [g if i < 6 + 3 * shift else "desert" for i, g in enumerate(gts)]
    vqa_p = ["yes"] * (2 + shift) + ["no"] * (4 - shift) + ["rural", "urban", "3"]
    vqa_g = ["yes"] * 6 + ["rural", "rural", "3"]
    vqa_t = ["presence"] * 3 + ["comp"] * 3 + ["rural_urban"] * 2 + ["count"]
    boxes = ["{<10><10><30><30>|<0>}", "{<40><40><60><60>|<45>}" if shift else "no box", "{<0><0><5><5>}"]
    gt_boxes = [[(10, 10, 30, 30)], [(40, 40, 60, 60)], [(50, 50, 60, 60)]]
    caps = M.caption_scores(
        ["a white plane", "storage tanks" if shift else "a ship"],
        [["a white airplane"], ["two storage tanks"]],
        meteor=False,
    )
    counts = dict(
        vision=304e6, projector=21e6, llm=6738e6 - 1e9 * (shift > 0), paper_total=6760.72e6, total=7063e6
    )
    params = dict(task="params_flops", params=counts, flops=dict(total=20e12), seq_len=1360)
    return {
        "UCMerced": M.scene_scores(preds, gts, classes),
        "AID": M.scene_scores(preds[::-1], gts[::-1], classes),
        "LRBEN": M.vqa_scores(vqa_p, vqa_g, vqa_t),
        "HRBEN": M.vqa_scores(vqa_p[:6], vqa_g[:6], vqa_t[:6]),
        "referring": M.grounding_scores(boxes, gt_boxes, groups={"size": ["small", "medium", "large"]}),
        "region captions": caps,
        "model": params,
    }


def test_markdown_report_layout_and_delta(tmp_path):
    results = {
        "teacher": _model_results(2),
        "student (before)": _model_results(0),
        "student (after)": _model_results(1),
    }
    md = report.markdown_report(
        results, title="Teacher vs student", delta=("student (before)", "student (after)")
    )
    assert "### Scene classification" in md
    assert "| model | UCMerced OA | UCMerced AA | AID OA | AID AA |" in md
    moa = "mOA (pooled, paper) | mean of types (not the paper's)"
    assert f"| model | presence | comparison | rural/urban | {moa} | count (not in mOA) |" in md
    assert "### VQA: HRBEN" in md and f"| model | presence | comparison | {moa} |" in md
    assert "| model | acc@0.5 | acc@0.25 | mean IoU (%) |" in md
    assert "| model | ROUGE-1 | ROUGE-L | METEOR |" in md
    assert "params (M, paper)" in md and "6760.72" in md
    assert "mOA (pooled, paper) = correct / questions" in md  # which mOA the paper uses, stated
    # rows: scene OA of the three models, and the after − before delta
    lines = md.splitlines()
    scene = lines[lines.index("| model | UCMerced OA | UCMerced AA | AID OA | AID AA |") + 2 :][:4]
    oa = [100 * 6 / 12, 100 * 9 / 12, 100 * 12 / 12]  # before, after, teacher
    assert scene[0].startswith(f"| teacher | {oa[2]:.2f} |")
    assert scene[1].startswith(f"| student (before) | {oa[0]:.2f} |")
    assert scene[3].startswith(f"| Δ (student (after) − student (before)) | {oa[1] - oa[0]:+.2f} |")
    # grounding breakdown by group, paper style (small / medium / large / single / overall)
    assert "| model | small | medium | large | single | overall |" in md
    # a missing metric shows as a dash, not a crash
    results["student (after)"].pop("AID")
    assert "| student (after) | 75.00 | 75.00 | – | – |" in report.markdown_report(results)
    paths = report.write_report(results, tmp_path / "out", name="eval", title="demo")
    data = json.loads(paths["json"].read_text())
    assert data["teacher"]["UCMerced"]["confusion"] == results["teacher"]["UCMerced"]["confusion"].tolist()
    assert paths["markdown"].read_text().startswith("## demo")


def test_to_jsonable():
    obj = {1: np.float32(0.5), "a": (np.int64(3), float("nan")), "m": np.eye(2, dtype=np.int32)}
    assert report.to_jsonable(obj) == {"1": 0.5, "a": [3, None], "m": [[1, 0], [0, 1]]}


def _check_png(path, min_size=(100, 100)):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        a = np.asarray(im.convert("RGB"))
    assert a.std() > 5  # not a blank canvas


def test_confusion_png(tmp_path):
    classes = ["beach", "river", "forest"]
    r = M.scene_scores(
        ["beach", "river", "huh", "forest", "forest"], ["beach", "river", "river", "forest", "beach"], classes
    )
    p = plots.plot_confusion(r["confusion"], classes, tmp_path / "cm.png", title="toy")
    _check_png(p)
    with pytest.raises(ValueError, match=r"\[3, 3\] or \[3, 4\]"):
        plots.plot_confusion(np.zeros((2, 2)), classes, tmp_path / "bad.png")


def test_ucmerced_21_class_confusion_and_grounding_pngs(shared_data, tmp_path):
    root = shared_data / "UCMerced_LandUse" / "Images"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    gts = [c for c in classes for _ in range(5)]
    preds = [g if rng.uniform() < 0.7 else classes[rng.integers(21)] for g in gts]
    r = M.scene_scores(preds, gts, classes)
    assert r["confusion"].shape == (21, 22)
    cm = plots.plot_confusion(r["confusion"], classes, tmp_path / "ucm_cm.png", title=f"OA {r['oa']:.1f}")
    _check_png(cm, (500, 500))
    examples = [
        dict(
            image=root / "airplane" / "airplane00.jpg",
            pred="{<20><30><45><55>|<30>}",
            gt=[(22, 28, 48, 52, 20)],
            title="[refer] airplane",
        ),
        dict(
            image=root / "storagetanks" / "storagetanks00.jpg",
            pred="{<10><10><30><30>|<0>}{<50><50><70><70>|<0>}",
            gt=[[10, 12, 30, 12, 30, 32, 10, 32], (55, 50, 75, 70)],
            title="[grounding] tanks",
        ),
    ]
    g = plots.plot_grounding(examples, tmp_path / "grounding.png", ncols=2)
    _check_png(g, (400, 200))


def test_grounding_and_loss_pngs_synthetic(tmp_path):
    img = (np.random.default_rng(0).uniform(0, 255, (64, 96, 3))).astype(np.uint8)
    ex = dict(image=img, pred=[(10, 10, 50, 50, 15)], gt=[(12, 8, 48, 52)])
    g = plots.plot_grounding(ex, tmp_path / "g.png")
    _check_png(g)
    steps = np.arange(0, 100, 10)
    p = plots.plot_loss_curves(
        {"train": np.exp(-steps / 50), "eval": (steps[::2], np.exp(-steps[::2] / 40))},
        tmp_path / "loss.png",
        title="loss",
        logy=True,
    )
    _check_png(p)
    with pytest.raises(ValueError, match="steps vs"):
        plots.plot_loss_curves({"x": ([1, 2], [1.0])}, tmp_path / "bad.png")
