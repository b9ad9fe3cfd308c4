"""`rskd-predict` on a tiny transformers Llava directory: a class-folder input with one corrupt image (an error
row, the others answered), a rerun that skips the answered rows and retries the failed one, the answers equal
to the evaluation Generator's on the same records, a JSONL {image, question} input with a missing image,
and the output scored by `launch/eval.py --config.predictions=...`."""

import json

import numpy as np
import pytest
from test_serve_testlib import tiny_hf_model, write_image

from configs import eval as eval_config
from rskd_jax.data import DataError, ExampleTransform, SceneFolderSource
from rskd_jax.eval import predict, runner
from rskd_jax.eval.generate import Generator
from rskd_jax.pretrained import load_pretrained
from rskd_jax.serve import predict_cli

STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    tiny_hf_model(d)
    root = d / "scenes"
    for k, name in enumerate(["airplane/a1.png", "airplane/a2.png", "forest/f1.png", "forest/f2.png"]):
        write_image(root / name, size=36, seed=k)
    (root / "forest" / "broken.png").write_bytes(b"\x89PNG truncated")
    return dict(model=d / "model", root=root)


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def run(tiny, out, *extra):
    argv = ["--model", str(tiny["model"]), "--out", str(out), "--batch-size", "2"]
    return predict_cli.main(argv + ["--max-new-tokens", str(STEPS), "--no-progress", *extra])


def test_folder_with_corrupt_image_then_resume(tiny, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert run(tiny, out, "--input", str(tiny["root"])) == 0
    assert "4 answered, 0 already done, 1 failed" in capsys.readouterr().out
    first = {r["id"]: r for r in rows(out)}
    assert sorted(first) == [
        "airplane/a1.png",
        "airplane/a2.png",
        "forest/broken.png",
        "forest/f1.png",
        "forest/f2.png",
    ]
    bad = first["forest/broken.png"]
    assert bad["prediction"] is None and "broken.png" in bad["error"] and "cannot decode" in bad["error"]
    good = [r for r in first.values() if "error" not in r]
    assert all(r["task"] == "scene" and r["reference"] in ("airplane", "forest") for r in good)

    # The same answers as the evaluation's Generator on the same records (one shared generation path).
    model, _ = load_pretrained(tiny["model"])
    src = SceneFolderSource(tiny["root"])
    recs = [r for r in src.records if "broken" not in r["id"]]
    tf = ExampleTransform(
        str(tiny["model"]),
        image_size=model.cfg.vision.image_size,
        image_seq_length=model.cfg.image_seq_length,
        max_len=400,
        max_prompt_len=300,
        template="llava_v1",
    )
    ex = [tf(r) for r in recs]
    texts = Generator(model, str(tiny["model"]), STEPS, 4)({k: np.stack([e[k] for e in ex]) for k in ex[0]})
    assert [first[r["id"]]["prediction"] for r in recs] == texts

    # Rerun: answered rows are kept and skipped, the corrupt image is tried again (and fails again).
    out.write_text(out.read_text() + '{"id": "cut off by a kil')
    assert run(tiny, out, "--input", str(tiny["root"])) == 0
    assert "0 answered, 4 already done, 1 failed" in capsys.readouterr().out
    again = rows(out)
    assert len(again) == 5 and {r["id"]: r for r in again} == first

    # Fixed image: only that row is generated.
    write_image(tiny["root"] / "forest" / "broken.png", size=36, seed=9)
    try:
        assert run(tiny, out, "--input", str(tiny["root"])) == 0
    finally:
        (tiny["root"] / "forest" / "broken.png").write_bytes(b"\x89PNG truncated")
    assert "1 answered, 4 already done, 0 failed" in capsys.readouterr().out
    assert [r for r in rows(out) if r["id"] == "forest/broken.png"][0]["prediction"] is not None


def test_jsonl_questions_and_missing_image(tiny, tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    img = tiny["root"] / "airplane" / "a1.png"
    src.write_text(
        json.dumps({"id": "q1", "image": str(img), "question": "[grounding]where is the plane?"})
        + "\n"
        + json.dumps({"id": "q2", "image": "missing.png", "question": "What is in this image?"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert run(tiny, out, "--input", str(src)) == 0
    got = {r["id"]: r for r in rows(out)}
    assert got["q1"]["task"] == "grounding" and isinstance(got["q1"]["prediction"], str)
    assert "missing.png: image file not found" in got["q2"]["error"]
    assert "1 answered, 0 already done, 1 failed" in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    assert run(tiny, tmp_path / "o.jsonl", "--input", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such file or folder" in err[0]


def test_eval_scores_a_predictions_file(tmp_path):
    """launch/eval.py --config.predictions: scene OA / AA from the rows, error rows counted, not scored."""
    q = "Classify the given image in one of the following classes. Classes: airplane, forest. \nAnswer in one word"
    lines = [
        dict(id="a1", task="scene", question=q, prediction="airplane", reference="airplane", meta={}),
        dict(id="a2", task="scene", question=q, prediction="forest", reference="airplane", meta={}),
        dict(id="f1", task="scene", question=q, prediction="Forest.", reference="forest", meta={}),
        dict(id="f2", task="scene", question=q, prediction=None, reference="forest", meta={}, error="bad"),
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = eval_config.get_config("scene")
    c.predictions, c.out_dir = str(path), str(tmp_path / "scores")
    res = runner.run_eval(c)["p"]
    assert res["oa"] == pytest.approx(200 / 3) and res["aa"] == pytest.approx(
        75.0
    )  # airplane 1/2, forest 1/1
    assert res["not_scored"] == {"error": 1}
    assert (tmp_path / "scores" / "metrics.md").is_file()
    only_errors = tmp_path / "e.jsonl"
    only_errors.write_text(json.dumps(dict(id="x", task="scene", prediction=None, error="bad")) + "\n")
    with pytest.raises(DataError, match="no scorable rows"):
        predict.score_file(only_errors)
