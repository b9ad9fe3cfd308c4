"""Metric writers (JSONL, TensorBoard event files, console), averaging, parameter overview, progress."""

import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from rskd_jax.train import writers
from rskd_jax.train.progress import Progress, console_metrics, format_duration


def crc32c_bitwise(data: bytes) -> int:
    """Independent CRC-32C (Castagnoli, RFC 3720): bit-at-a-time, no table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_message_class():
    """tf.Event / Summary / TensorProto subset, declared here from tensorflow's .proto field numbers."""
    f = descriptor_pb2.FileDescriptorProto(name="rskd_test_event.proto", package="rskdtest", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                fd.type_name = f".rskdtest.{tname}"

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("PluginData", ("plugin_name", 1, T.TYPE_STRING, opt, None))
    msg("SummaryMetadata", ("plugin_data", 1, T.TYPE_MESSAGE, opt, "PluginData"))
    msg("TensorShape")
    msg(
        "Tensor",
        ("dtype", 1, T.TYPE_INT32, opt, None),
        ("tensor_shape", 2, T.TYPE_MESSAGE, opt, "TensorShape"),
        ("string_val", 8, T.TYPE_BYTES, rep, None),
    )
    msg(
        "Value",
        ("tag", 1, T.TYPE_STRING, opt, None),
        ("simple_value", 2, T.TYPE_FLOAT, opt, None),
        ("tensor", 8, T.TYPE_MESSAGE, opt, "Tensor"),
        ("metadata", 9, T.TYPE_MESSAGE, opt, "SummaryMetadata"),
    )
    msg("Summary", ("value", 1, T.TYPE_MESSAGE, rep, "Value"))
    msg(
        "Event",
        ("wall_time", 1, T.TYPE_DOUBLE, opt, None),
        ("step", 2, T.TYPE_INT64, opt, None),
        ("file_version", 3, T.TYPE_STRING, opt, None),
        ("summary", 5, T.TYPE_MESSAGE, opt, "Summary"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("rskdtest.Event"))


def split_records(raw: bytes) -> list[bytes]:
    """TFRecord framing checked with the independent CRC; ValueError on a mismatch or a truncated record."""
    out, i = [], 0
    while i < len(raw):
        if len(raw) - i < 12:
            raise ValueError(f"truncated record header at byte {i}")
        header = raw[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", raw[i + 8 : i + 12])[0] != masked(crc32c_bitwise(header)):
            raise ValueError(f"length CRC mismatch at byte {i}")
        payload = raw[i + 12 : i + 12 + n]
        if len(payload) != n or len(raw) < i + 16 + n:
            raise ValueError(f"truncated record at byte {i}")
        if struct.unpack("<I", raw[i + 12 + n : i + 16 + n])[0] != masked(crc32c_bitwise(payload)):
            raise ValueError(f"data CRC mismatch at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


def read_events(path) -> list[dict]:
    """An event file decoded with the independent framing and message classes: [{step, scalars, texts}]."""
    Event = event_message_class()
    out = []
    for rec in split_records(open(path, "rb").read()):
        e = Event.FromString(rec)
        values = e.summary.value
        scalars = {v.tag: v.simple_value for v in values if not v.HasField("tensor")}
        texts = {v.tag: b"".join(v.tensor.string_val).decode() for v in values if v.HasField("tensor")}
        out.append({"step": e.step, "scalars": scalars, "texts": texts})
    return out


def test_crc32c_known_vectors():
    """The bitwise reference CRC that checks the event files' framing, against RFC 3720's check values."""
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert crc32c_bitwise(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c_bitwise(b"") == 0


def test_tensorboard_event_file_round_trip(tmp_path):
    with writers.TensorBoardWriter(tmp_path / "tb") as w:
        w.write_scalars(3, {"loss": 1.25, "kl/reverse": jnp.float32(-0.5)})
        w.write_scalars(10, {"loss": float("nan")})
        w.write_texts(10, {"sample": "a beach with ünïcode"})
        path = w.path
    assert "events.out.tfevents." in path
    raw = open(path, "rb").read()
    Event = event_message_class()
    events = [Event.FromString(r) for r in split_records(raw)]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 3 and [(v.tag, v.simple_value) for v in events[1].summary.value] == [
        ("loss", 1.25),
        ("kl/reverse", -0.5),
    ]
    assert events[1].wall_time > 1.6e9
    assert events[2].step == 10 and math.isnan(events[2].summary.value[0].simple_value)
    text = events[3].summary.value[0]
    assert text.tag == "sample" and text.metadata.plugin_data.plugin_name == "text"
    assert text.tensor.dtype == 7 and text.tensor.string_val[0].decode() == "a beach with ünïcode"
    # the same, through the reader the tests below use
    mine = read_events(path)
    assert mine[1]["scalars"] == {"loss": 1.25, "kl/reverse": -0.5} and mine[1]["step"] == 3
    assert mine[3]["texts"] == {"sample": "a beach with ünïcode"}
    # a flipped byte is caught
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC mismatch|truncated"):
        split_records(bytes(bad))


def test_jsonl_console_and_multiwriter(tmp_path):
    stream = io.StringIO()
    w = writers.MultiWriter([writers.JsonlWriter(tmp_path), writers.ConsoleWriter(stream)])
    w.write_scalars(1, {"loss": jnp.float32(2.0), "acc": 0.5})
    w.write_scalars(2, {"loss": np.float64(1.0)})
    w.write_texts(2, {"note": "hi"})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert (
        rows[0]["loss"] == 2.0
        and rows[0]["acc"] == 0.5
        and rows[1]["loss"] == 1.0
        and rows[2]["note"] == "hi"
    )
    assert all(r["time"] > 1.6e9 for r in rows)
    assert stream.getvalue().splitlines() == ["[1] loss=2 acc=0.5", "[2] loss=1", "[2] note: hi"]
    # appending keeps a resumed run's log in one file
    with writers.JsonlWriter(tmp_path / "metrics.jsonl") as w2:
        w2.write_scalars(3, {"loss": 0.5})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_create_default_writer(tmp_path):
    w = writers.create_default_writer(tmp_path)
    w.write_scalars(5, {"x": 1.0})
    w.close()
    assert (tmp_path / "metrics.jsonl").exists()
    (event_file,) = list((tmp_path / "tb").iterdir())
    assert read_events(event_file)[1]["scalars"] == {"x": 1.0}


def test_url_workdir_uploads_through_tensorstore(tmp_path):
    """gs:// workdirs go through tensorstore's kvstore; file:// exercises the same code path locally."""
    url = f"file://{tmp_path}/remote/run"
    w = writers.create_default_writer(url)
    w.write_scalars(1, {"loss": 3.0})
    w.write_texts(1, {"s": "x"})
    w.close()
    remote = tmp_path / "remote" / "run"
    assert [json.loads(ln)["step"] for ln in (remote / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    (event_file,) = list((remote / "tb").iterdir())
    assert read_events(event_file)[1]["scalars"] == {"loss": 3.0}
    with writers.JsonlWriter(url + "/metrics.jsonl") as w2:  # a resumed run appends to the remote file
        w2.write_scalars(2, {"loss": 2.0})
        w2.flush()
        assert len((remote / "metrics.jsonl").read_text().splitlines()) == 3
        staging = w2._f.local_path
    assert not os.path.exists(staging)


def test_averages_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=7), rng.normal(size=4)
    avg = writers.Averages()
    for i, x in enumerate(a):
        avg.update({"loss": jnp.asarray(x), **({"kl": b[i]} if i < len(b) else {})})
    out = avg.compute()
    np.testing.assert_allclose(out["loss"], a.mean(), rtol=1e-6)
    np.testing.assert_allclose(out["kl"], b.mean(), rtol=1e-6)
    avg.reset()
    assert not avg and avg.compute() == {}


def test_progress_line_rates_and_eta():
    t = [100.0]
    out = io.StringIO()
    p = Progress(100, every=10, start_step=0, tokens_per_step=512, stream=out, clock=lambda: t[0])
    lines = []
    for step in range(1, 31):
        t[0] += 0.5 if step <= 10 else 0.25  # 2 steps/s, then 4 steps/s
        line = p.update(step, {"loss": 1.0 / step, "kl": 0.25})
        if line:
            lines.append(line)
    assert len(lines) == 3 and out.getvalue().splitlines() == lines
    assert lines[0].startswith("step 10/100 (10.0%) | loss 0.1 kl 0.25 | 2 steps/s | 1.02k tok/s")
    assert lines[0].endswith(f"ETA {format_duration(90 / 2.0)}") and format_duration(45) == "45s"
    # window rate after the first print: 10 steps in 2.5 s -> 4 steps/s, 2048 tok/s, 70 steps left -> 17.5 s
    assert "| 4 steps/s | 2.05k tok/s | ETA 18s" in lines[2]
    assert format_duration(3723) == "1h02m03s" and format_duration(274) == "4m34s"
    # explicit token counts; the last step always prints
    p2 = Progress(5, every=10, stream=io.StringIO(), clock=lambda: t[0])
    for step in range(1, 6):
        t[0] += 1.0
        line = p2.update(step, tokens=100)
    assert line is not None and "step 5/5 (100.0%)" in line and "100.0 tok/s" in line and "ETA 0s" in line


def test_console_line_is_short_unless_all_metrics():
    """The distillation step's metric names (loss terms only for non-zero weights, per-layer feature terms,
    rollout and optimizer statistics): the line shows the total and at most 4 terms; log_all_metrics all."""
    m = {
        "loss/rkl": 0.5, "loss/pg": 0.25, "loss/sft": 1.5, "loss/fkl": 0.75, "loss/feat_proj": 0.125,
        "loss/feat_text/0": 0.1, "loss/feat_text/1": 0.2, "loss/total": 3.0, "rollout/rev_kl_k3": 0.4,
        "rollout/length": 12.0, "rollout/iw_mean": 1.0, "rollout/iw_max": 1.5, "rollout/iw_min": 0.5,
        "teacher/prefix_fallback": 0.0, "data/prompt_not_prefix": 0.0, "grad_norm": 2.0, "skipped": 0.0,
        "lr": 1e-4,
    }  # fmt: skip
    short = console_metrics(m)
    assert short == {"loss": 3.0, "rkl": 0.5, "pg": 0.25, "sft": 1.5, "fkl": 0.75}
    assert console_metrics({"loss/total": 2.0, "loss/sft": 2.0, "grad_norm": 1.0}) == {
        "loss": 2.0,
        "sft": 2.0,
    }
    assert console_metrics(m, all_metrics=True) == m
    p = Progress(100, every=10, tokens_per_step=512, stream=io.StringIO(), clock=lambda: 0.0)
    line, long = p.format(10, short), p.format(10, console_metrics(m, True))
    assert (
        line.startswith("step 10/100 (10.0%) | loss 3 rkl 0.5 pg 0.25 sft 1.5 fkl 0.75 |") and "ETA" in line
    )
    assert len(line) < 120 < len(long) and "grad_norm" in long and "grad_norm" not in line
