"""Task scorers against hand-made data, written-out formulas and pycocoevalcap's METEOR called directly."""

import collections
import itertools

import numpy as np
import pytest

from rskd_jax.eval import metrics as M

# --------------------------------------------------------------------------- scene classification


def test_scene_scores_hand_made_confusion():
    classes = ["beach", "river", "tennis court"]
    gts = ["beach"] * 4 + ["river"] * 2 + ["tenniscourt"]
    preds = ["Beach.", "beach", "river", "I think it is a desert", "River", "rivers", "Tennis courts"]
    r = M.scene_scores(preds, gts, classes)
    expected = np.array(
        [
            [2, 1, 0, 1],  # beach: 2 right, 1 -> river, 1 unmatched
            [0, 2, 0, 0],
            [0, 0, 1, 0],
        ]
    )
    np.testing.assert_array_equal(r["confusion"], expected)
    assert r["oa"] == pytest.approx(100 * 5 / 7)
    assert r["aa"] == pytest.approx((50 + 100 + 100) / 3)
    assert r["per_class"] == {"beach": 50.0, "river": 100.0, "tennis court": 100.0}
    assert (r["n"], r["unmatched"], r["task"]) == (7, 1, "scene")


def test_scene_label_quirks_and_free_text():
    aid = ["Airport", "BareLand", "MediumResidential", "Park", "Parking", "StorageTanks", "Church"]
    m = M.ClassMatcher(aid)
    name = lambda t: None if m.match(t) is None else aid[m.match(t)]
    assert aid[m.match_gt("MediumResidentialgt")] == "MediumResidential"  # AID jsonl ground truth
    assert aid[m.match_gt("StorageTanksgt")] == "StorageTanks"
    assert name("storage tank") == "StorageTanks"
    assert name("Medium residential.") == "MediumResidential"
    assert name("bare land") == "BareLand"
    assert name("churches") == "Church"
    assert name("The image shows a parking lot.") == "Parking"  # whole words: not "Park"
    assert name("park") == "Park"
    assert name("An airport next to a park") is None  # two classes named: ambiguous -> no match
    assert name("residential") is None
    assert name("") is None
    with pytest.raises(ValueError, match="'Desertgt'"):
        m.match_gt("Desertgt")
    with pytest.raises(ValueError, match="distinct"):
        M.ClassMatcher(["Park", "park"])


def test_scene_strict_is_geochats_rule():
    classes = ["tenniscourt", "storagetanks", "beach"]
    gts = ["tenniscourt", "storagetanks", "beach", "beach"]
    preds = ["Tennis Court.", "storage tank", "There is a beach", "beach"]
    # GeoChat batch_geochat_scene.py, written out: pred.replace(' ','').lower().replace('.','') == gt
    literal = [p.replace(" ", "").lower().replace(".", "") == g for p, g in zip(preds, gts)]
    strict = M.scene_scores(preds, gts, classes, strict=True)
    assert strict["oa"] == pytest.approx(100 * np.mean(literal)) == 50.0
    assert M.scene_scores(preds, gts, classes)["oa"] == 100.0


def test_scene_ucmerced_folder_names(shared_data):
    folders = sorted(p.name for p in (shared_data / "UCMerced_LandUse" / "Images").iterdir() if p.is_dir())
    assert len(folders) == 21
    m = M.ClassMatcher(folders)
    spaced = {
        "baseballdiamond": "baseball diamond",
        "denseresidential": "dense residential",
        "golfcourse": "golf course",
        "mediumresidential": "medium residential",
        "mobilehomepark": "mobile home park",
        "parkinglot": "parking lot",
        "sparseresidential": "sparse residential",
        "storagetanks": "storage tanks",
        "tenniscourt": "tennis court",
    }
    for i, f in enumerate(folders):
        assert m.match(f) == i and m.match(spaced.get(f, f).title() + ".") == i
        assert m.match(f"This is an aerial image of {spaced.get(f, f)}.") == i


# --------------------------------------------------------------------------- VQA


def test_vqa_scores_micro_and_macro():
    preds = [
        "Yes.",
        "yes",
        "No, there is not.",
        "no",  # presence: 3/4 right
        "Yes",
        "no",  # comp: 1/2
        "Rural.",  # rural_urban: 1/1
        "three",
        "5",
    ]  # count: 1/2 (not in mOA)
    gts = ["yes", "yes", "no", "yes", "yes", "yes", "rural", "3", "4"]
    types = ["presence"] * 4 + ["comp"] * 2 + ["rural_urban"] + ["count"] * 2
    r = M.vqa_scores(preds, gts, types)
    assert r["per_type"] == {"presence": 75.0, "comparison": 50.0, "rural_urban": 100.0, "count": 50.0}
    assert r["moa_micro"] == pytest.approx(100 * 5 / 7)  # pooled: GeoChat's "average accuracy"
    assert r["moa"] == r["moa_micro"] and "paper" in r["moa_convention"]  # the headline is the pooled one
    assert r["moa_macro"] == pytest.approx((75 + 50 + 100) / 3)  # mean of types
    assert r["moa_types"] == ["presence", "comparison", "rural_urban"]
    assert r["n_per_type"]["count"] == 2 and r["n"] == 9
    # community GeoChat rule: pred.replace(' ','').lower().replace('.','') == gt.lower()
    strict = M.vqa_scores(preds, gts, types, strict=True)
    literal = [p.replace(" ", "").lower().replace(".", "") == g.lower() for p, g in zip(preds, gts)]
    assert strict["per_type"]["presence"] == 100 * np.mean(literal[:4]) == 50.0
    assert strict["per_type"]["count"] == 100 * np.mean(literal[7:]) == 0.0  # "three" != "3"
    with pytest.raises(ValueError, match="differ"):
        M.vqa_scores(["yes"], ["yes", "no"], ["presence"])


def test_normalize_vqa_answer():
    n = M.normalize_vqa_answer
    raw = ["Yes.", "No, it is not", "  YES</s>", "The area is urban.", "0 m2.", "Four"]
    assert [n(x) for x in raw] == ["yes", "no", "yes", "urban", "0m2", "4"]
    assert n("between 10m2 and 100m2") == n("Between 10m2 and 100m2.")


# --------------------------------------------------------------------------- grounding


def _brute_force_all_matched(iou, thr):
    n_gt, n_pred = iou.shape
    return n_pred >= n_gt and any(
        all(iou[i, p[i]] >= thr for i in range(n_gt)) for p in itertools.permutations(range(n_pred), n_gt)
    )


def test_grounding_hand_made():
    strip = lambda x1, x2: (x1, 0, x2, 10)  # 1-D intervals: IoU = overlap / union of [x1, x2]
    gt_trap = [strip(0, 10), strip(2, 12)]
    # P1 = [0.5, 10.5] has IoU .905 with GT1 and .739 with GT2; P2 = [-3, 7] has .538 with GT1, .333 GT2.
    # Greedy (largest IoU first) pairs P1-GT1 and fails GT2; the one-to-one optimum P1-GT2, P2-GT1 succeeds.
    trap = "{<0.5><0><10.5><10>|<0>}{<-3><0><7><10>|<0>}"
    preds = [
        "{<10><10><30><30>|<0>}",  # exact
        "{<10><10><30><30>|<0>}",  # IoU 1/3 with [20,40]
        "{<50><50><60><60>}{<0><0><10><10>}",  # two objects, swapped order
        "{<0><0><10><10>}",  # two objects, one box
        "{<1><2><3>} malformed",  # no box
        trap,
    ]
    gts = [
        [(10, 10, 30, 30)],
        [(20, 10, 40, 30)],
        [(0, 0, 10, 10), (50, 50, 60, 60)],
        [(0, 0, 10, 10), (50, 50, 60, 60)],
        [(0, 0, 10, 10)],
        gt_trap,
    ]
    sizes = ["large", "small", "large", "small", "small", "large"]
    r = M.grounding_scores(preds, gts, groups={"size": sizes})
    assert r["acc@0.5"] == pytest.approx(100 * 3 / 6)  # samples 0, 2, 5
    assert r["acc@0.25"] == pytest.approx(100 * 4 / 6)  # + sample 1
    assert r["n_no_box"] == 1 and r["n"] == 6
    assert r["by_group"]["objects"]["multi"] == {
        "n": 3,
        "acc@0.5": pytest.approx(200 / 3),
        "acc@0.25": pytest.approx(200 / 3),
    }
    assert r["by_group"]["size"]["large"]["acc@0.5"] == 100.0
    # the trap, checked against brute force over all assignments
    from rskd_jax.eval import boxes as B

    iou = B.iou_matrix(B.parse_boxes(trap), gt_trap)
    assert iou[0, 0] == pytest.approx(9.5 / 10.5) and iou[1, 0] == pytest.approx(8.5 / 11.5)
    assert _brute_force_all_matched(iou, 0.5) and M._all_matched(iou, 0.5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = rng.uniform(0, 1, (rng.integers(1, 4), rng.integers(1, 5)))
        assert M._all_matched(m, 0.5) == _brute_force_all_matched(m, 0.5)


def test_grounding_polygons_pixels_and_rotation():
    # GeoChat-Bench style: ground truth = 4-point polygon in pixels of a 1024 px image; prediction on 0-100.
    poly_px = [409.6, 409.6, 614.4, 409.6, 614.4, 614.4, 409.6, 614.4]  # [40, 60]^2 on the grid
    r = M.grounding_scores(["{<40><40><60><60>|<45>}"], [[poly_px]], gt_image_sizes=[(1024, 1024)])
    assert r["mean_iou"] == pytest.approx(1 / np.sqrt(2))  # rotated 45° vs axis-aligned square
    assert r["acc@0.5"] == 100.0
    hbb = M.grounding_scores(
        ["{<40><40><60><60>|<45>}"], [[poly_px]], gt_image_sizes=[(1024, 1024)], rotated=False
    )
    # rotated=False compares enclosing axis-aligned boxes: the 45° prediction's has side 20√2 -> 400 / 800.
    assert hbb["mean_iou"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no ground-truth box"):
        M.grounding_scores(["{<1><2><3><4>}"], [[]])


# --------------------------------------------------------------------------- captions


def _lcs(a, b):
    t = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, j in itertools.product(range(len(a)), range(len(b))):
        t[i + 1, j + 1] = t[i, j] + 1 if a[i] == b[j] else max(t[i, j + 1], t[i + 1, j])
    return t[-1, -1]


def _f(overlap, n_pred, n_ref):
    p, r = overlap / n_pred, overlap / n_ref
    return 0.0 if overlap == 0 else 2 * p * r / (p + r)


def test_rouge_against_written_out_formula():
    preds = ["<p>a white plane</p> parked near the terminal.", "two storage tanks", "nothing here"]
    refs = [["the white airplane parked at the terminal", "a plane"], "storage tanks on the left", ["ship"]]
    r = M.caption_scores(preds, refs, meteor=False)
    r1, rl = [], []
    for p, rs in zip(preds, refs):
        pw = M.clean_caption(p).lower().split()
        rs = [rs] if isinstance(rs, str) else rs
        r1.append(
            max(
                _f(
                    sum((collections.Counter(pw) & collections.Counter(x.split())).values()),
                    len(pw),
                    len(x.split()),
                )
                for x in rs
            )
        )
        rl.append(max(_f(_lcs(pw, x.split()), len(pw), len(x.split())) for x in rs))
    assert M.clean_caption(preds[0]) == "a white plane parked near the terminal"
    assert r["rouge1"] == pytest.approx(100 * np.mean(r1)) and r["rougeL"] == pytest.approx(100 * np.mean(rl))
    assert r1[0] == pytest.approx(_f(4, 7, 7)) and rl[1] == pytest.approx(_f(2, 3, 5))
    assert "meteor" not in r
    with pytest.raises(ValueError, match="sample 0 has no reference"):
        M.caption_scores(["x"], [[]], meteor=False)


def test_meteor_matches_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    reference = Meteor()  # its JVM loads while ours does
    preds = ["<p>a white airplane</p>.", "storage tanks", "a large green field with trees", "", "ship\nboat"]
    refs = [
        ["a white plane", "an airplane parked at the gate"],
        ["two round storage tanks"],
        ["a green farmland"],
        ["a harbor"],
        ["a ship"],
    ]
    r = M.caption_scores(preds, refs)
    gts = {i: [M.clean_caption(x) for x in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(M.clean_caption(p).split())] for i, p in enumerate(preds)}
    corpus, per = reference.compute_score(gts, res)
    assert r["meteor"] == pytest.approx(100 * corpus, abs=1e-9)
    assert r["meteor_per_sample"] == pytest.approx(per, abs=1e-12)
    assert r["meteor_mean"] == pytest.approx(100 * np.mean(per))
    assert 0 < r["meteor"] < 100 and r["meteor_per_sample"][3] == 0.0


def test_meteor_without_java_says_so(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java runtime"):
        M.MeteorScorer()


def test_headline_moa_is_the_pooled_average_the_paper_reports():
    """Paper Table 5, GeoChat-7B on HRBEN: presence 57.65, comparison 80.84, mOA 70.63. Rebuilt with the
    presence share 0.44 all its rows imply (4400 presence, 5600 comparison questions), the pooled accuracy
    gives the paper's mOA; the mean of the two types (69.25) does not."""
    n_p, n_c = 4400, 5600
    ok_p, ok_c = round(0.5765 * n_p), round(0.8084 * n_c)
    preds = ["yes"] * ok_p + ["no"] * (n_p - ok_p) + ["yes"] * ok_c + ["no"] * (n_c - ok_c)
    gts = ["yes"] * (n_p + n_c)
    r = M.vqa_scores(preds, gts, ["presence"] * n_p + ["comp"] * n_c)
    assert r["moa"] == pytest.approx(70.63, abs=0.02)
    assert r["moa_macro"] == pytest.approx(69.25, abs=0.02)
