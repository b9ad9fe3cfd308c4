"""Task evaluation end to end: real UC Merced images with a tiny random model; the task dispatch on small
files in the real dataset formats (RSVQA JSON, GeoChat-Bench referring / region-captioning jsonl) with
scripted answers whose scores are worked out by hand here; the rs-synth smoke run through `run_eval`; the
params CLI.
"""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from rskd_jax.data import SceneFolderSource, SynthSource
from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.eval import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_synth_tokenizer(d, vocab_size=400, num_records=300)
    return d


def canon(s):  # independent normalisation: lower-case letters and digits only
    return re.sub(r"[^a-z0-9]", "", s.lower())


def spread_indices(n, limit):
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- UC Merced


def test_scene_ucmerced_tiny_random_model(shared_data, tok_dir, tmp_path):
    from rskd_jax.data.tokenizer import load_tokenizer

    src = SceneFolderSource(shared_data / "UCMerced_LandUse")
    tok = load_tokenizer(tok_dir)
    model = runner.random_model(runner.smoke_config("tiny", tok), seed=0)
    res = runner.evaluate(
        model,
        tok,
        {"ucm": src},
        runner.Generation(
            tasks=("scene",), limit=42, batch_size=8, max_new_tokens=6, max_prompt_len=384, progress=False
        ),
        runner.Scoring(out_dir=tmp_path, meteor=False, model_name="tiny-random"),
    )
    m = res["ucm"]
    conf = np.asarray(m["confusion"])
    assert conf.shape == (21, 22) and m["n"] == 42
    np.testing.assert_array_equal(conf.sum(1), np.full(21, 2))  # 2 images of every class
    png = Image.open(m["figure"])
    assert png.format == "PNG" and min(png.size) > 300
    rows = read_jsonl(tmp_path / "predictions" / "ucm.jsonl")
    assert [r["id"] for r in rows] == [src.records[i]["id"] for i in spread_indices(1470, 42)]
    exact = np.array([canon(r["prediction"]) == canon(r["reference"]) for r in rows])
    assert m["oa"] == pytest.approx(100 * exact.mean())
    per_class = [exact[[r["meta"]["label"] == c for r in rows]].mean() for c in range(21)]
    assert m["aa"] == pytest.approx(100 * np.mean(per_class))
    assert all(isinstance(r["prediction"], str) for r in rows) and any(r["prediction"] for r in rows)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tiny-random"]["ucm"]["oa"] == pytest.approx(m["oa"])
    assert "| ucm OA | ucm AA |" in (tmp_path / "metrics.md").read_text()


def test_scene_scores_follow_the_answers(shared_data, tok_dir, tmp_path):
    """Scripted answers per example (right in words, right as a sentence, wrong class): OA, AA and confusion
    matrix are worked out by hand, which checks that answers, records and labels stay aligned."""
    src = SceneFolderSource(shared_data / "UCMerced_LandUse")
    idx = spread_indices(len(src), 42)
    names = src.class_names

    def answer(k):
        c = src.records[idx[k]]["meta"]["label"]
        return [names[c], f"It is {names[c].upper()}.", f"This is a {names[(c + 1) % 21]}."][k % 3]

    def stub(batch):
        return [answer(int(k)) if k >= 0 else "" for k in batch["example_id"]]

    res = runner.evaluate(
        None,
        tok_dir,
        {"ucm": src},
        runner.Generation(
            tasks=("scene",),
            limit=42,
            batch_size=8,
            image_size=32,
            image_seq_length=16,
            max_prompt_len=384,
            generator=stub,
            progress=False,
        ),
        runner.Scoring(out_dir=tmp_path),
    )
    m = res["ucm"]
    labels = np.array([src.records[i]["meta"]["label"] for i in idx])
    right = np.arange(42) % 3 != 2
    assert m["oa"] == pytest.approx(100 * right.mean())
    assert m["aa"] == pytest.approx(100 * np.mean([right[labels == c].mean() for c in range(21)]))
    want = np.zeros((21, 22), int)
    for k, c in enumerate(labels):
        want[c, c if right[k] else (c + 1) % 21] += 1
    np.testing.assert_array_equal(np.asarray(m["confusion"]), want)


# ------------------------------------------------------------------------------- VQA, grounding, captioning


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(path)


VQA = [  # (question, type, ground truth, scripted answer)
    ("Is there a road?", "presence", "yes", "Yes"),
    ("Is there a building?", "presence", "no", "yes"),
    ("Is there a water area?", "presence", "no", "No."),
    ("Are there more roads than buildings?", "comp", "yes", "yes"),
    ("Is the number of roads equal to the number of water areas?", "comp", "no", "no"),
    ("Is it a rural or an urban area?", "rural_urban", "rural", "urban"),
    ("How many buildings are there?", "count", "4", "4"),  # count: dropped by RSVQASource's default
]
REFER = [  # (expression, type, GT polygons, scripted answer): IoU 1, 0.6, one of two, 0.391, no box
    ("the red car", "ref", [[10, 10, 30, 10, 30, 30, 10, 30]], "{<10><10><30><30>|<0>}"),
    ("the big ship", "ref", [[50, 50, 70, 50, 70, 70, 50, 70]], "{<55><50><75><70>|<0>}"),
    (
        "all planes",
        "grounding",
        [[0, 0, 20, 0, 20, 20, 0, 20], [60, 0, 80, 0, 80, 20, 60, 20]],
        "<p>planes</p>{<0><0><20><20>|<0>}",
    ),
    ("the tank", "grounding", [[40, 40, 60, 40, 60, 60, 40, 60]], "{<45><45><65><65>|<0>}"),
    ("the bridge", "ref", [[0, 80, 20, 80, 20, 100, 0, 100]], "a bridge"),
]
CAPTIONS = [  # (box, GT phrase, scripted answer): ROUGE-1 F = 1, 0, 0.8 (P 2/3, R 1)
    ("{<10><10><30><30>|<0>}", "small vehicle", "small vehicle"),
    ("{<50><50><70><70>|<0>}", "storage tank", "harbor"),
    ("{<0><0><40><40>|<0>}", "large ship", "a large ship"),
]


SCENE_PROMPT = (
    "Classify the given image in one of the following classes. Classes: dense residential, river, harbor. "
    "\nAnswer in one word or a short phrase."
)
SCENE = [
    ("denseresidential/a.png", "denseresidential"),
    ("river/b.png", "Rivergt"),
    ("harbor/c.png", "harbor"),
]


def write_datasets(root):
    rsvqa = root / "RSVQA_LR"
    qs, ans, imgs = [], [], []
    for i, (q, t, gt, _) in enumerate(VQA):
        qs.append(dict(id=i, img_id=i, question=q, type=t, answers_ids=[i], active=True))
        ans.append(dict(id=i, answer=gt, active=True))
        imgs.append(dict(id=i, active=True))
        _image(rsvqa / "Images_LR" / f"{i}.tif")
    for kind, data in (("questions", qs), ("answers", ans), ("images", imgs)):
        (rsvqa / f"LR_split_test_{kind}.json").write_text(json.dumps({kind: data}))
    lines = []
    for i, (expr, t, polys, _) in enumerate(REFER):
        lines.append(
            dict(
                question_id=i, image_id=f"r{i}", question=expr, ground_truth=polys, type=t, size_group="small"
            )
        )
        _image(root / "images" / f"r{i}.png")
    (root / "referring.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    lines = []
    for i, (box, gt, _) in enumerate(CAPTIONS):
        lines.append(dict(question_id=i, image_id=f"c{i}", question=box, ground_truth=gt))
        _image(root / "images" / f"c{i}.png")
    (root / "region_captioning.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    lines = []  # GeoChat-Bench scene jsonl: classes only in the prompt, AID-style "gt" quirk in one label
    for i, (qid, gt) in enumerate(SCENE):
        lines.append(dict(question_id=qid, image=f"s{i}.png", text=SCENE_PROMPT, ground_truth=gt))
        _image(root / "images" / f"s{i}.png")
    (root / "UCmerced.jsonl").write_text("\n".join(json.dumps(x) for x in lines))


def test_dispatch_all_tasks_scored_by_hand(tok_dir, tmp_path):
    from rskd_jax.data.tokenizer import load_tokenizer

    write_datasets(tmp_path / "data")
    tok = load_tokenizer(tok_dir)
    keys = (
        [(q, a) for q, _, _, a in VQA] + [(e, a) for e, _, _, a in REFER] + [(b, a) for b, _, a in CAPTIONS]
    ) + [("Classify the given image", "River.")]  # the same answer to every scene prompt

    def stub(batch):  # answers by the prompt text (decoded back from the tokens)
        out = []
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"]):
            text = tok.decode(ids[mask == 1], skip_special_tokens=True)
            hits = [a for k, a in keys if k in text]
            assert len(hits) == 1, text
            out.append(hits[0])
        return out

    c = eval_config.get_config("all")
    c.data_dir, c.image_root = str(tmp_path / "data"), str(tmp_path / "data" / "images")
    sources = runner.build_sources(c)
    assert sorted(sources) == ["referring", "region_captioning", "rsvqa_LR_test"]
    sources.update(runner.task_sources("scene", str(tmp_path / "data" / "UCmerced.jsonl"), c))
    res = runner.evaluate(
        None,
        tok,
        sources,
        runner.Generation(generator=stub, image_size=32, image_seq_length=16, batch_size=4, progress=False),
        runner.Scoring(meteor=False, out_dir=tmp_path / "out"),
    )
    v = res["rsvqa_LR_test"]
    assert v["per_type"] == pytest.approx({"presence": 200 / 3, "comparison": 100.0, "rural_urban": 0.0})
    assert v["moa_micro"] == pytest.approx(400 / 6) and v["moa_macro"] == pytest.approx((200 / 3 + 100) / 3)
    g = res["referring"]
    assert g["acc@0.5"] == pytest.approx(40.0) and g["acc@0.25"] == pytest.approx(60.0)
    assert g["n_no_box"] == 1
    assert g["by_group"]["type"]["refer"]["acc@0.5"] == pytest.approx(200 / 3)
    assert g["by_group"]["type"]["grounding"]["acc@0.25"] == pytest.approx(50.0)
    assert pathlib.Path(g["figure"]).is_file()
    cap = res["region_captioning"]
    assert cap["rouge1"] == pytest.approx(60.0) and cap["rougeL"] == pytest.approx(60.0)
    assert "meteor" not in cap
    s = res["UCmerced"]
    assert s["classes"] == ["dense residential", "river", "harbor"]
    assert s["oa"] == pytest.approx(100 / 3) and s["aa"] == pytest.approx(100 / 3)
    np.testing.assert_array_equal(np.asarray(s["confusion"]), [[0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    md = (tmp_path / "out" / "metrics.md").read_text()
    for heading in (
        "### VQA: rsvqa_LR_test",
        "### Referring / grounding: referring",
        "### Region captioning",
    ):
        assert heading in md


# ------------------------------------------------------------------------------------ smoke and the CLI


def test_synth_all_smoke_run_eval(tok_dir, tmp_path):
    c = eval_config.get_config("synth,limit=16")
    c.tokenizer, c.out_dir, c.max_new_tokens, c.progress = str(tok_dir), str(tmp_path), 8, False
    res = runner.run_eval(c)
    src = SynthSource(c.synth_size, image_size=c.synth_image_size, seed=c.seed, split="test")
    groups = {runner.TASK_GROUP[src.sample(i)[0]["task"]] for i in spread_indices(len(src), 16)}
    assert len(groups) > 2
    assert set(res) == {f"rs_synth/{g}" for g in groups}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["tiny"]) == set(res)
    assert (tmp_path / "metrics.md").read_text().count("###") >= len(groups)
    n = sum(len(read_jsonl(p)) for p in (tmp_path / "predictions").glob("*.jsonl"))
    assert n == 16 == sum(m["n"] for m in res.values())


PAPER_T8 = {"geochat_7b": (6760.72, 6904.53), "geochat_13b": (13048.66, 13377.05)}


def test_params_cli_prints_paper_count_without_weights(tmp_path):
    # The CLI runs in a child that reports its OWN peak RSS when it exits: VmHWM of its address space.
    # (RUSAGE_CHILDREN of this pytest process is the largest of every child any earlier test started, and
    # the child's own ru_maxrss keeps the forked copy of pytest's RSS across exec on Linux: 4.03 GiB in CI.)
    argv = [str(ROOT / "launch" / "eval.py"), "--config", str(ROOT / "configs" / "eval.py") + ":params"]
    argv.append(f"--config.out_dir={tmp_path}")
    wrapper = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n"
        "    hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
        "    print('PEAK_RSS_KIB', hwm.split()[1], file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {n: next(ln for ln in out.stdout.splitlines() if ln.startswith(f"| {n} ")) for n in PAPER_T8}
    for name, (params_m, paper_gflops) in PAPER_T8.items():  # the paper's Table 8
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        assert cells[4] == f"{params_m:.2f}"
        assert float(cells[6]) == pytest.approx(paper_gflops, rel=1e-3)  # paper convention, within 0.1 %
    assert "GFLOPs (paper) = " in out.stdout and "GFLOPs (full) = " in out.stdout  # both explained
    peak_gib = int(out.stderr.split("PEAK_RSS_KIB")[-1].split()[0]) / 2**20
    assert peak_gib < 4  # 7B weights in float32 would be ~27 GiB: nothing was allocated
    assert (
        json.loads((tmp_path / "params.json").read_text())["geochat_7b"]["params_flops"]["params"][
            "paper_total"
        ]
        == 6_760_723_456
    )


# --------------------------------------------------------------------------------- widths sized from the data
AID_CLASSES = (
    "Airport BareLand BaseballField Beach Bridge Center Church Commercial DenseResidential Desert Farmland Forest "
    "Industrial Meadow MediumResidential Mountain Park Parking Playground Pond Port RailwayStation Resort River "
    "School SparseResidential Square Stadium StorageTanks Viaduct"
).split()


def test_aid_prompt_widths_sized_from_the_data_with_any_tokenizer(tok_dir, tmp_path, caplog):
    """AID's 30-class prompt is longer than image tokens + 256 with a non-LLaMA tokenizer (the old default
    stopped at the first image with a DataError); unset widths are now sized from the prompts and logged."""
    from rskd_jax.data import ExampleTransform
    from rskd_jax.data.errors import DataError

    for c in AID_CLASSES:
        _image(tmp_path / "AID" / c / f"{c.lower()}_1.jpg")
    src = SceneFolderSource(tmp_path / "AID")
    kw = dict(image_size=32, image_seq_length=16, template="llava_v1")  # evaluate's template
    probe = ExampleTransform(tok_dir, max_len=4096, max_prompt_len=4096, **kw)
    need = probe.encode_text(src[0]).prompt_ends[-1]
    assert need > 16 + 256  # the case of the issue: the old default width is too small
    old = ExampleTransform(tok_dir, max_len=16 + 256 + 8, max_prompt_len=16 + 256, **kw)
    with pytest.raises(DataError, match="exceeds max_prompt_len"):
        old(src[0])

    def stub(batch):
        width = batch["prompt_ids"].shape[1]
        assert width >= need and width % 64 == 0
        return [
            src.class_names[int(k)] if k >= 0 else "" for k in batch["example_id"]
        ]  # AID: 1 image / class

    with caplog.at_level("INFO", logger="rskd_jax.eval.lengths"):
        res = runner.evaluate(
            None, tok_dir, {"aid": src},
            runner.Generation(
                tasks=("scene",), batch_size=8, image_size=32, image_seq_length=16, generator=stub, progress=False
            ),
            runner.Scoring(meteor=False),
        )  # fmt: skip
    assert res["aid"]["oa"] == pytest.approx(100.0)
    assert any(
        f"max_prompt_len={-(-need // 64) * 64} (longest prompt {need} tokens)" in r.getMessage()
        for r in caplog.records
    )
    assert eval_config.get_config("scene").max_prompt_len == 0  # configs/eval.py:scene leaves it to the data
