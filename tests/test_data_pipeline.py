"""Grain pipeline: determinism, exact resume (0 and 2 workers, orbax), sharding coverage, mixtures,
bad-record skipping, evaluation batches."""

import collections
import gc
import logging
import os
import pathlib
import re
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from rskd_jax.data import pipeline
from rskd_jax.data.errors import DataError
from rskd_jax.data.sources import ListSource
from rskd_jax.data.synth import SynthSource, train_synth_tokenizer
from rskd_jax.data.transforms import ExampleTransform


@pytest.fixture(scope="module")
def transform(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    train_synth_tokenizer(tok_dir, num_records=300)
    return ExampleTransform(str(tok_dir), image_size=32, image_seq_length=4, max_len=112, max_prompt_len=96)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(xs, ys):
    return len(xs) == len(ys) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys)
    )


def _ds(transform, seed=0, n=64, **kw):
    return pipeline.make_dataset(
        SynthSource(n, image_size=24, seed=3),
        transform,
        batch_size=4,
        seed=seed,
        shard_index=0,
        shard_count=1,
        **kw,
    )


def test_same_seed_same_batches_and_resume(transform, tmp_path):
    a = _take(
        pipeline.make_iterator(_ds(transform)), 20
    )  # 64 records / 4 = 16 batches per epoch: crosses one
    assert _equal(a, _take(pipeline.make_iterator(_ds(transform)), 20))
    assert not _equal(a[:3], _take(pipeline.make_iterator(_ds(transform, seed=1)), 3))
    assert not _equal(a[:3], a[16:19])  # epoch 2 is reshuffled
    assert {k: (v.shape, v.dtype.name) for k, v in a[0].items()} == {
        "pixel_values": ((4, 32, 32, 3), "float32"),
        "input_ids": ((4, 112), "int32"),
        "attention_mask": ((4, 112), "int32"),
        "loss_mask": ((4, 112), "int32"),
        "prompt_ids": ((4, 96), "int32"),
        "prompt_mask": ((4, 96), "int32"),
    }
    for k in (0, 5, 15):  # restore at step k -> the uninterrupted batches from k + 1 on
        it = pipeline.make_iterator(_ds(transform))
        _take(it, k)
        state = it.get_state()
        fresh = pipeline.make_iterator(_ds(transform))
        fresh.set_state(state)
        assert _equal(_take(fresh, 3), a[k : k + 3])
    # through orbax + grain's checkpoint handler, as the trainer stores it
    it = pipeline.make_iterator(_ds(transform))
    _take(it, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("ds",)) as mngr:
        mngr.save(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        fresh = pipeline.make_iterator(_ds(transform))
        mngr.restore(7, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(fresh)))
    assert _equal(_take(fresh, 3), a[7:10])


def test_resume_with_two_workers(transform):
    it = pipeline.make_iterator(_ds(transform), num_workers=2)
    try:
        ref = _take(it, 6)
        it2 = pipeline.make_iterator(_ds(transform), num_workers=2)
        try:
            _take(it2, 3)
            state = it2.get_state()
        finally:
            it2.close()
        it3 = pipeline.make_iterator(_ds(transform), num_workers=2)
        try:
            it3.set_state(state)
            got = _take(it3, 3)
        finally:
            it3.close()
        assert _equal(got, ref[3:6]) and not _equal(got, ref[:3])
        assert isinstance(got[0]["input_ids"], np.ndarray)  # a view of shared memory (no copy by default)
    finally:
        it.close()
        del it
        gc.collect()


def _ids(n):
    return ListSource([{"image": None, "k": i} for i in range(n)])


def _k(r):
    return {"k": np.int32(r["k"])}


def test_two_processes_get_disjoint_shards_covering_each_epoch():
    n, epochs = 37, 3
    per_shard = []
    for s in range(2):
        ds = pipeline.make_dataset(
            _ids(n),
            _k,
            batch_size=1,
            seed=5,
            shard_index=s,
            shard_count=2,
            num_epochs=epochs,
            drop_remainder=False,
            with_metadata=True,
        )
        got = [int(b["example_id"][0]) for b in ds]
        assert got == [int(b["k"][0]) for b in ds]
        size = len(range(s, n, 2))
        assert len(got) == epochs * size
        per_shard.append([got[e * size : (e + 1) * size] for e in range(epochs)])
    for e in range(epochs):
        a, b = set(per_shard[0][e]), set(per_shard[1][e])
        assert not a & b and a | b == set(range(n)) and len(a) + len(b) == n
    assert per_shard[0][0] != per_shard[0][1]  # a new global permutation every epoch
    assert len({tuple(sorted(per_shard[0][e])) for e in range(epochs)}) > 1  # ... re-split between processes


def test_mixture_weights():
    ds = pipeline.make_dataset(
        [_ids(50), _ids(50)],
        _k,
        weights=[3, 1],
        batch_size=8,
        seed=0,
        shard_index=0,
        shard_count=1,
        with_metadata=True,
    )
    it = iter(ds)
    src = np.concatenate([next(it)["source_id"] for _ in range(10)])
    assert (src == 0).mean() == 0.75
    with pytest.raises(ValueError, match="fewer than shard_count"):
        pipeline.make_dataset(_ids(1), _k, batch_size=1, shard_index=0, shard_count=2)


def test_bad_records_raise_or_are_skipped_and_counted(transform, tmp_path, caplog):
    recs = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(p)
        recs.append(
            {
                "id": f"r{i}",
                "image": str(p),
                "conversations": [
                    {"from": "human", "value": "<image>\nIs there a ship?"},
                    {"from": "gpt", "value": "No"},
                ],
            }
        )
    (tmp_path / "bad.jpg").write_bytes((tmp_path / "0.png").read_bytes()[:40])
    recs[2] = {**recs[2], "image": str(tmp_path / "bad.jpg")}
    recs[4] = {**recs[4], "image": str(tmp_path / "missing.jpg")}
    src = ListSource(recs)
    kw = dict(batch_size=1, shuffle=False, num_epochs=1, shard_index=0, shard_count=1, drop_remainder=False)
    with pytest.raises(DataError, match="bad.jpg: cannot decode image"):
        list(pipeline.make_dataset(src, transform, **kw))
    with caplog.at_level(logging.WARNING):
        out = list(pipeline.make_dataset(src, transform, skip_bad_records=True, with_metadata=True, **kw))
    assert [int(b["example_id"][0]) for b in out] == [0, 1, 3, 5]
    assert "r2: " not in caplog.text  # the message names the file, not only the id
    # records are read by several threads, so the two skips may be counted in either order
    assert re.search(
        rf"skipped bad record #[12]: {re.escape(str(tmp_path / 'bad.jpg'))}: cannot decode image", caplog.text
    )
    assert re.search(
        rf"skipped bad record #[12]: {re.escape(str(tmp_path / 'missing.jpg'))}: image file not found",
        caplog.text,
    )
    assert "skipped bad record #2" in caplog.text and "#3" not in caplog.text


def test_eval_batches_pad_and_return_records():
    src = _ids(10)
    got = list(pipeline.eval_batches(src, _k, batch_size=4))
    assert [b["example_id"].tolist() for b, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    assert [[r["k"] for r in recs] for _, recs in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b["k"].shape == (4,) for b, _ in got)
    shards = [
        b["example_id"]
        for s in range(3)
        for b, _ in pipeline.eval_batches(src, _k, 2, shard_index=s, shard_count=3)
    ]
    ids = np.concatenate(shards)
    assert collections.Counter(ids[ids >= 0].tolist()) == collections.Counter(range(10))


def test_own_memory_copies_batches_out_of_shared_memory(transform):
    it = pipeline.make_iterator(_ds(transform), num_workers=1, own_memory=True)
    try:
        got = _take(it, 2)
    finally:
        it.close()
    assert all(type(b["input_ids"]) is np.ndarray for b in got)
    ref = _take(pipeline.make_iterator(_ds(transform)), 2)
    assert _equal(got, ref)


PLAIN_SCRIPT = """
import sys
import grain
import numpy as np
from rskd_jax.data.pipeline import make_iterator

def square(i):
    return {"x": np.full((2,), i * i, np.int32)}

if __name__ == "__main__":
    ds = grain.MapDataset.range(8).map(square).batch(2).to_iter_dataset()
    it = make_iterator(ds, num_workers=2)
    got = [b["x"][:, 0].tolist() for b in it]
    it.close()
    assert "absl.app" not in sys.modules, "the check needs a process that never went through absl.app"
    print("BATCHES", got)
"""


def test_workers_from_plain_python_without_absl_app(tmp_path):
    """A script or notebook that never ran absl.app: grain's workers read absl flags, the library handles it."""
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BATCHES [[0, 1], [4, 9], [16, 25], [36, 49]]" in out.stdout, out.stdout + out.stderr[-2000:]
