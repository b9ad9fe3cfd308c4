"""Metric writers without TensorFlow: JSONL, TensorBoard event files, console; plus metric helpers.

* `JsonlWriter`        - `workdir/metrics.jsonl`, one JSON object per write: `{"step", "time", **scalars}`.
* `TensorBoardWriter`  - `events.out.tfevents.*` files written by hand: tf.Event protobufs (scalars as
                         `simple_value`, texts as string tensors for the text plugin) in TFRecord framing
                         with masked CRC32C, which is all TensorBoard reads. `read_events` reads them back.
* `ConsoleWriter`, `MultiWriter`, `create_default_writer` (files on process 0 only).
  File writers take local paths or URLs (gs://...): see `AppendFile`.
* `Averages`           - running means of step metrics with `clu.metrics.Average` (clu's metric classes work
                         without TF; `clu.metric_writers` does not).
* `log_parameter_overview` - the parameter table from `clu.parameter_overview`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Interface: `write_scalars(step, {name: number})`, `write_texts(step, {name: str})`, flush, close."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_url(path: str) -> bool:
    return "://" in path


class AppendFile:
    """An append-only binary file at a local path or a URL (`gs://bucket/dir/file`, `file:///...`).

    URLs are written to a local staging copy that is uploaded whole with tensorstore's kvstore (the GCS
    client orbax already uses; no gcsfs/TensorFlow) on `flush()`/`close()`, and from `write` at most every
    `upload_every_s` seconds. An existing remote file is downloaded first, so appends continue it.
    """

    def __init__(self, path: str | os.PathLike, upload_every_s: float = 30.0):
        self.path, self.upload_every_s = os.fspath(path), upload_every_s
        self._kv = None
        if _is_url(self.path):
            import tempfile

            import tensorstore as ts

            base, self._key = self.path.rsplit("/", 1)
            self._kv = ts.KvStore.open(base + "/").result()
            local = os.path.join(tempfile.mkdtemp(prefix="rskd-writer-"), self._key)
            with open(local, "wb") as f:
                f.write(bytes(self._kv.read(self._key).result().value))
        else:
            local = self.path
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        self.local_path = local
        self._f = open(local, "ab")
        self._uploaded = time.monotonic()

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()  # the local file is always current; uploads are rate-limited
        if self._kv is not None and time.monotonic() - self._uploaded > self.upload_every_s:
            self.flush()

    def flush(self) -> None:
        self._f.flush()
        if self._kv is not None:
            with open(self.local_path, "rb") as f:
                self._kv.write(self._key, f.read()).result()
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()
            if self._kv is not None:
                import shutil

                shutil.rmtree(os.path.dirname(self.local_path), ignore_errors=True)


class JsonlWriter(MetricWriter):
    """Appends one JSON object per write to `path` (a path not ending in .jsonl means `path/metrics.jsonl`).

    Local paths or URLs (see AppendFile). Appending keeps the log of a resumed run in one file; non-finite
    numbers are written as NaN/Infinity (Python's json reads them back).
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not path.endswith(".jsonl"):
            path = path.rstrip("/") + "/metrics.jsonl"
        self.path = path
        self._f = AppendFile(path)

    def _write(self, step: int, payload: dict) -> None:
        line = json.dumps({"step": int(step), "time": time.time(), **payload}) + "\n"
        self._f.write(line.encode())

    def write_scalars(self, step, scalars):
        self._write(step, {k: _scalar(v) for k, v in scalars.items()})

    def write_texts(self, step, texts):
        self._write(step, {k: str(v) for k, v in texts.items()})

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


class ConsoleWriter(MetricWriter):
    """Prints `[step] name=value ...` lines (and texts) to a stream, flushed."""

    def __init__(self, stream: TextIO | None = None, prefix: str = ""):
        self.stream, self.prefix = stream, prefix

    def _print(self, line: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def write_scalars(self, step, scalars):
        body = " ".join(f"{k}={_scalar(v):.6g}" for k, v in scalars.items())
        self._print(f"{self.prefix}[{int(step)}] {body}")

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._print(f"{self.prefix}[{int(step)}] {k}: {v}")


class MultiWriter(MetricWriter):
    """Forwards every call to each writer."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        scalars = {k: _scalar(v) for k, v in scalars.items()}  # one device->host transfer for all writers
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_texts(self, step, texts):
        for w in self.writers:
            w.write_texts(step, texts)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


# ------------------------------------------------------------------------------- TensorBoard event files
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc of the length, data, masked crc of the data (little endian)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# Minimal protobuf wire encoding for the few tf.Event fields we write.
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int = 0, *, file_version: str | None = None, values: bytes = b"") -> bytes:
    """tf.Event: wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 (Summary)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if values:
        out += _bytes_field(5, values)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    """Summary.value=1 -> Value{tag=1, simple_value=2 (float)}."""
    return _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))


def _text_value(tag: str, text: str) -> bytes:
    """Value{tag=1, metadata=9{plugin_data=1{plugin_name=1:"text"}}, tensor=8{dtype=1:DT_STRING(7),
    tensor_shape=2:{} (scalar), string_val=8}}."""
    metadata = _bytes_field(1, _bytes_field(1, b"text"))
    tensor = _field(1, 0, _varint(7)) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
    return _bytes_field(
        1, _bytes_field(1, tag.encode()) + _bytes_field(9, metadata) + _bytes_field(8, tensor)
    )


class TensorBoardWriter(MetricWriter):
    """A TensorBoard event file in `logdir` (local or URL): scalars and texts, without TF or tensorboard."""

    def __init__(self, logdir: str | os.PathLike):
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.rskd"
        self.path = os.fspath(logdir).rstrip("/") + "/" + name
        self._f = AppendFile(self.path)
        self._f.write(tfrecord(_event(time.time(), file_version="brain.Event:2")))
        self._f.flush()

    def write_scalars(self, step, scalars):
        values = b"".join(_scalar_value(k, _scalar(v)) for k, v in scalars.items())
        self._f.write(tfrecord(_event(time.time(), int(step), values=values)))

    def write_texts(self, step, texts):
        values = b"".join(_text_value(k, str(v)) for k, v in texts.items())
        self._f.write(tfrecord(_event(time.time(), int(step), values=values)))

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _parse(buf: bytes) -> list[tuple[int, int, Any]]:
    """Protobuf message -> [(field number, wire type, value)] (value: int, or bytes for wire types 1/2/5)."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _read_varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 5:
            val, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((num, wire, val))
    return out


def read_tfrecords(path: str | os.PathLike) -> list[bytes]:
    """Record payloads of a TFRecord file; raises ValueError naming the file and offset on a CRC mismatch."""
    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        if len(data) - i < 12:
            raise ValueError(f"{path}: truncated record header at byte {i}")
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8 : i + 12])
        if hcrc != masked_crc32c(header):
            raise ValueError(f"{path}: length CRC mismatch at byte {i}")
        payload = data[i + 12 : i + 12 + n]
        if len(payload) != n or len(data) < i + 16 + n:
            raise ValueError(f"{path}: truncated record at byte {i} (expected {n} bytes)")
        (dcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        if dcrc != masked_crc32c(payload):
            raise ValueError(f"{path}: data CRC mismatch at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


def read_events(path: str | os.PathLike) -> list[dict]:
    """Decodes a TensorBoardWriter event file: [{wall_time, step, file_version?, scalars, texts}]."""
    events = []
    for rec in read_tfrecords(path):
        ev: dict[str, Any] = {"step": 0, "scalars": {}, "texts": {}}
        for num, _, val in _parse(rec):
            if num == 1:
                ev["wall_time"] = struct.unpack("<d", val)[0]
            elif num == 2:
                ev["step"] = val - (1 << 64) if val >> 63 else val
            elif num == 3:
                ev["file_version"] = val.decode()
            elif num == 5:
                for vnum, _, value in _parse(val):
                    if vnum != 1:
                        continue
                    fields = {n: v for n, _, v in _parse(value)}
                    tag = fields[1].decode()
                    if 2 in fields:
                        ev["scalars"][tag] = struct.unpack("<f", fields[2])[0]
                    elif 8 in fields:
                        strings = [v for n, _, v in _parse(fields[8]) if n == 8]
                        ev["texts"][tag] = b"".join(strings).decode()
        events.append(ev)
    return events


def create_default_writer(
    workdir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    jsonl: bool = True,
    console: bool = False,
    primary_only: bool = True,
) -> MultiWriter:
    """JSONL (`workdir/metrics.jsonl`) + TensorBoard (`workdir/tb/`) [+ console]; files only on process 0.

    `workdir` may be a gs:// URL (see AppendFile).
    """
    import jax

    writers: list[MetricWriter] = []
    if not primary_only or jax.process_index() == 0:
        if jsonl:
            writers.append(JsonlWriter(os.fspath(workdir).rstrip("/") + "/metrics.jsonl"))
        if tensorboard:
            writers.append(TensorBoardWriter(os.fspath(workdir).rstrip("/") + "/tb"))
        if console:
            writers.append(ConsoleWriter())
    return MultiWriter(writers)


# ------------------------------------------------------------------------------------- metric helpers
class Averages:
    """Running means of named step metrics (clu.metrics.Average each), e.g. between two log steps.

    `update` keeps device arrays (no host sync per step); `compute` returns floats. Metrics missing from
    some updates are averaged over the updates that had them.
    """

    def __init__(self):
        from clu import metrics as clu_metrics

        self._average = clu_metrics.Average
        self._m: dict[str, Any] = {}

    def update(self, metrics: Mapping[str, Any]) -> None:
        import jax.numpy as jnp

        for k, v in metrics.items():
            new = self._average.from_model_output(jnp.asarray(v, jnp.float32))
            self._m[k] = new if k not in self._m else self._m[k].merge(new)

    def compute(self) -> dict[str, float]:
        return {k: float(m.compute()) for k, m in self._m.items()}

    def reset(self) -> None:
        self._m = {}

    def __bool__(self) -> bool:
        return bool(self._m)


def log_parameter_overview(
    params: Any,
    *,
    include_stats: bool | None = None,
    max_stats_params: int = 50_000_000,
    logger: logging.Logger | None = None,
) -> str:
    """Logs (INFO) and returns the parameter table from `clu.parameter_overview`.

    `params` is a pytree, an `nnx.State` or an `nnx.Module` (its `nnx.Param`s). Mean/std columns are added
    when `include_stats` is True, or by default when there are at most `max_stats_params` parameters and all
    arrays are fully addressable (stats of a 13B model would pull every weight to the host).
    """
    import jax
    from clu import parameter_overview
    from flax import nnx

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if include_stats is None:
        leaves = jax.tree.leaves(params)
        n = sum(int(np.prod(x.shape)) for x in leaves if hasattr(x, "shape"))
        include_stats = n <= max_stats_params and all(
            getattr(x, "is_fully_addressable", True) for x in leaves
        )
    table = parameter_overview.get_parameter_overview(params, include_stats=include_stats)
    for line in table.splitlines():
        (logger or log).info("%s", line)
    return table
