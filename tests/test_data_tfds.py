"""TFDS builders (ArrayRecord, no TensorFlow): build from a manual_dir, read through as_data_source()."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from rskd_jax.data import pipeline
from rskd_jax.data.errors import DataError
from rskd_jax.data.sources import SceneFolderSource
from rskd_jax.data.tfds_builders import TfdsSource, build
from rskd_jax.data.transforms import decode_image


def test_ucmerced_real_tiffs(shared_data, tmp_path):
    manual = shared_data / "UCMerced_LandUse_tif"
    b = build("ucmerced", manual, tmp_path / "tfds")
    assert b.info.splits["train"].num_examples == 21 and "tensorflow" not in sys.modules
    src, ref = TfdsSource(b.data_dir, "train"), SceneFolderSource(manual)
    by_id = {r["id"]: r for r in ref.records}
    assert sorted(src[i]["id"] for i in range(len(src))) == sorted(by_id)
    for i in range(len(src)):
        r = src[i]
        want = by_id[r["id"]]
        assert r["conversations"] == want["conversations"] and r["meta"] == want["meta"]
        np.testing.assert_array_equal(decode_image(r["image"]), decode_image(want["image"]))
    ds = pipeline.make_dataset(
        src,
        lambda r: {"label": np.int32(r["meta"]["label"])},
        batch_size=7,
        seed=0,
        num_epochs=1,
        shard_index=0,
        shard_count=1,
    )
    assert sorted(np.concatenate([x["label"] for x in ds]).tolist()) == list(range(21))
    build("ucmerced", manual, tmp_path / "tfds")  # second call reuses the files


def test_ucmerced_bad_image_and_wrong_classes(shared_data, tmp_path):
    images = shared_data / "UCMerced_LandUse_tif" / "Images"
    m = tmp_path / "m" / "Images"
    for c in sorted(p.name for p in images.iterdir()):
        (m / c).mkdir(parents=True)
        (m / c / f"{c}00.tif").symlink_to(images / c / f"{c}00.tif")
    (m / "river" / "river01.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"river01.jpg: cannot decode image"):
        build("ucmerced", m.parent, tmp_path / "tfds")
    b = build("ucmerced", m.parent, tmp_path / "tfds2", skip_bad_records=True)
    assert b.info.splits["train"].num_examples == 21
    (m / "zoo").mkdir()
    (m / "zoo" / "z.png").symlink_to(images / "river" / "river00.tif")
    with pytest.raises(DataError, match="classes"):
        build("ucmerced", m.parent, tmp_path / "tfds3")


def test_rsvqa_and_instruct_builders(tmp_path):
    m = tmp_path / "m"
    (m / "Images_LR").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(m / "Images_LR" / "3.tif")
    qs = [
        {"id": 0, "img_id": 3, "type": "count", "question": "How many?", "answers_ids": [0], "active": True}
    ]
    for kind, data in (
        ("questions", qs),
        ("answers", [{"id": 0, "answer": "4", "active": True}]),
        ("images", [{"id": 3, "questions_ids": [0], "active": True}]),
    ):
        (m / f"LR_split_test_{kind}.json").write_text(json.dumps({kind: data}))
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A farm."}]
    (m / "GeoChat_Instruct.json").write_text(
        json.dumps([{"id": "x1", "image": "Images_LR/3.tif", "conversations": conv}])
    )
    b = build("rsvqa", m, tmp_path / "tfds", config="lr")
    r = TfdsSource(b.data_dir, "test", image_root=m)[0]
    assert r["meta"] == {"question_id": 0, "type": "count", "answer": "4", "img_id": 3}
    assert r["conversations"][0]["value"].startswith("<image>\nHow many?\nAnswer the question")
    assert decode_image(r["image"])[0, 0].tolist() == [9, 9, 9]
    b = build("geochat_instruct", m, tmp_path / "tfds")
    r = TfdsSource(b.data_dir, "train", image_root=m)[0]
    assert r["conversations"] == conv and r["image"] == str(m / "Images_LR/3.tif")
    with pytest.raises(ValueError, match="image_root"):
        TfdsSource(b.data_dir, "train")[0]
