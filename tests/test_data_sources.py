"""Sources: real UC Merced folders and captions, instruct JSON, RSVQA, GeoChat-Bench; bad input."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from rskd_jax.data.errors import DataError
from rskd_jax.data.sources import (
    CaptionSource,
    GeoChatBenchSource,
    InstructSource,
    RSVQASource,
    SceneFolderSource,
    class_words,
    infer_task,
)
from rskd_jax.data.transforms import decode_image

UCM = [
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
]


def test_ucmerced_jpg_and_tif(shared_data):
    for sub, per_class, ext in (("UCMerced_LandUse", 70, ".jpg"), ("UCMerced_LandUse_tif", 1, ".tif")):
        src = SceneFolderSource(shared_data / sub)
        assert src.classes == UCM and len(src) == 21 * per_class
        labels = np.array([src[i]["meta"]["label"] for i in range(len(src))])
        assert np.bincount(labels).tolist() == [per_class] * 21
        for i in range(len(src)):  # every image decodes
            r = src[i]
            assert r["image"].endswith(ext) and r["id"].startswith(r["meta"]["class"] + "/")
            img = decode_image(r["image"])
            assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) > 200
    r = src[src.classes.index("denseresidential")]
    q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
    assert a == "dense residential" and r["task"] == "scene"
    assert q.startswith(
        "<image>\nClassify the given image in one of the following classes. Classes: agricultural, "
        "airplane, baseball diamond, beach, "
    )
    assert q.endswith("storage tanks, tennis court. \nAnswer in one word or a short phrase.")


def test_ucm_captions(shared_data):
    root = shared_data / "UCMerced_LandUse/Images"
    src = CaptionSource(shared_data / "ucm_captions.jsonl", root)
    assert len(src) == 1292 and all(len(src[i]["meta"]["captions"]) == 5 for i in range(len(src)))
    assert all((root / src[i]["id"]).is_file() for i in range(len(src)))
    assert len(CaptionSource(shared_data / "ucm_captions.jsonl", root, per_caption=True)) == 5 * 1292


def test_infer_task():
    qs = [
        "[refer] where is <p>plane</p> ?",
        "[grounding]Describe",
        "[identify] What is the object present at {",
        "Classify the given image in one of",
        "Is it rural?\nAnswer the question using a single word or phrase.",
        "Describe the image in detail.",
    ]
    assert [infer_task(q) for q in qs] == ["refer", "grounding", "region_caption", "scene", "vqa", "instruct"]


def test_class_words():
    assert [
        class_words(c)
        for c in ("mobilehomepark", "DenseResidential", "StorageTanks", "dense_residential", "Airport")
    ] == ["mobile home park", "dense residential", "storage tanks", "dense residential", "airport"]


def _img(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def test_scene_folder_aid_layout_and_empty_class(tmp_path, caplog):
    for c, n in (("BareLand", 2), ("DenseResidential", 3)):
        for k in range(n):
            _img(tmp_path / "AID" / c / f"{c.lower()}_{k + 1}.jpg")
    (tmp_path / "AID" / "Empty").mkdir()
    (tmp_path / "AID" / "BareLand" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"AID/Empty: empty class folder"):
        SceneFolderSource(tmp_path / "AID")
    with caplog.at_level(logging.WARNING):
        src = SceneFolderSource(tmp_path / "AID", skip_bad_records=True)
    assert src.bad.count == 1 and "skipped bad record #1" in caplog.text and "Empty" in caplog.text
    assert src.class_names == ["bare land", "dense residential"] and len(src) == 5
    assert "Classes: bare land, dense residential. \n" in src[0]["conversations"][0]["value"]


def test_instruct_json_and_malformed_jsonl(tmp_path):
    recs = [
        {
            "id": "a",
            "image": "x/a.png",
            "conversations": [
                {"from": "human", "value": "Describe <image> briefly."},
                {"from": "gpt", "value": "A port."},
                {"from": "human", "value": "Any ships?"},
                {"from": "gpt", "value": "Yes"},
            ],
        },
        {"id": "b", "image": "x/b.png", "conversations": [{"from": "gpt", "value": "oops"}]},
    ]
    (tmp_path / "i.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"i.json\[1\] id=b: turn 0 is from 'gpt'"):
        InstructSource(tmp_path / "i.json", tmp_path)
    src = InstructSource(tmp_path / "i.json", tmp_path, skip_bad_records=True)
    assert len(src) == 1 and src.bad.count == 1 and src[0]["image"] == str(tmp_path / "x/a.png")
    assert src[0]["task"] == "instruct"
    lines = [json.dumps(recs[0]), "{not json", json.dumps(recs[0])]
    (tmp_path / "i.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"i.jsonl:2: malformed JSON line"):
        InstructSource(tmp_path / "i.jsonl", tmp_path)
    src = InstructSource(tmp_path / "i.jsonl", tmp_path, skip_bad_records=True)
    assert len(src) == 2 and src.bad.count == 1
    with pytest.raises(DataError, match="file not found"):
        InstructSource(tmp_path / "none.json", tmp_path)


def test_rsvqa_join(tmp_path):
    qs = [
        {
            "id": 0,
            "img_id": 5,
            "type": "presence",
            "question": "Is there a road?",
            "answers_ids": [0],
            "active": True,
        },
        {
            "id": 1,
            "img_id": 5,
            "type": "count",
            "question": "How many roads?",
            "answers_ids": [1],
            "active": True,
        },
        {
            "id": 2,
            "img_id": 6,
            "type": "comp",
            "question": "More x than y?",
            "answers_ids": [2],
            "active": False,
        },
        {
            "id": 3,
            "img_id": 6,
            "type": "rural_urban",
            "question": "Rural or urban?",
            "answers_ids": [3],
            "active": True,
        },
    ]
    ans = [
        {"id": i, "question_id": i, "answer": a, "active": True}
        for i, a in enumerate(["yes", "3", "no", "urban"])
    ]
    ims = [
        {"id": 5, "questions_ids": [0, 1], "active": True},
        {"id": 6, "questions_ids": [2, 3], "active": True},
    ]
    for kind, data in (("questions", qs), ("answers", ans), ("images", ims)):
        (tmp_path / f"LR_split_test_{kind}.json").write_text(json.dumps({kind: data}))
    src = RSVQASource(tmp_path, "test")
    assert [(r["meta"]["question_id"], r["meta"]["type"], r["meta"]["answer"]) for r in src.records] == [
        (0, "presence", "yes"),
        (3, "rural_urban", "urban"),
    ]
    assert src[0]["conversations"][0]["value"] == (
        "<image>\nIs there a road?\nAnswer the question using a single word or phrase."
    )
    assert src[1]["image"] == str(tmp_path / "Images_LR/6.tif")
    assert len(RSVQASource(tmp_path, "test", exclude_types=())) == 3


def test_geochat_bench_kinds(tmp_path):
    rows = {
        "scene.jsonl": {
            "question_id": "forest/forest01.tif",
            "image": "forest01.tif",
            "text": "Classify ... \nAnswer in one word or a short phrase.",
            "ground_truth": "forest",
        },
        "vqa.jsonl": {
            "question_id": 7,
            "image": "12.tif",
            "text": "Is it rural?\nAnswer the question using a single word or phrase.",
            "category": "rural_urban",
        },
        "ref.jsonl": {
            "question_id": 1,
            "image_id": "P0001_0003",
            "question": "silver plane",
            "type": "ref",
            "ground_truth": [[10, 20, 30, 20, 30, 40, 10, 40]],
            "size_group": "small",
        },
        "cap.jsonl": {
            "question_id": 2,
            "image_id": "P0002",
            "question": "{<1><2><3><4>|<0>}",
            "ground_truth": "small vehicle",
        },
    }
    for name, row in rows.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
    scene = GeoChatBenchSource(tmp_path / "scene.jsonl", tmp_path)[0]
    assert (
        scene["task"] == "scene" and scene["meta"]["class"] == "forest" and len(scene["conversations"]) == 1
    )
    vqa = GeoChatBenchSource(tmp_path / "vqa.jsonl", tmp_path, answers={7: "rural"})[0]
    assert vqa["conversations"][1]["value"] == "rural" and vqa["meta"]["type"] == "rural_urban"
    ref = GeoChatBenchSource(tmp_path / "ref.jsonl", tmp_path)[0]
    assert (
        ref["conversations"][0]["value"] == "<image>\n[refer] Give me the location of <p> silver plane </p>"
    )
    assert ref["image"] == str(tmp_path / "P0001_0003.png") and ref["meta"]["boxes"] == [[10, 20, 30, 40]]
    cap = GeoChatBenchSource(tmp_path / "cap.jsonl", tmp_path)[0]
    assert (
        cap["conversations"][0]["value"]
        == "<image>\n[identify] What is the object present at {<1><2><3><4>|<0>}"
    )
    assert cap["task"] == "region_caption" and cap["conversations"][1]["value"] == "small vehicle"
    (tmp_path / "odd.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"odd.jsonl:1: cannot tell the GeoChat-Bench kind"):
        GeoChatBenchSource(tmp_path / "odd.jsonl", tmp_path)
