"""Metric writers without TensorFlow: JSONL, TensorBoard event files, console; plus running averages.

* `JsonlWriter`        - `workdir/metrics.jsonl`, one JSON object per write: `{"step", "time", **scalars}`.
* `TensorBoardWriter`  - `events.out.tfevents.*` files through tensorboardX (its Event/Summary protobufs and
                         TFRecord writer): scalars as `simple_value`, texts as string tensors for the text
                         plugin.
* `ConsoleWriter`, `MultiWriter`, `create_default_writer` (files on process 0 only).
  File writers take local paths or URLs (gs://...): see `AppendFile`.
* `Averages`           - running means of step metrics with `clu.metrics.Average` (clu's metric classes work
                         without TF; `clu.metric_writers` does not).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import numpy as np
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2

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
class _AppendFileFactory:
    """tensorboardX's writer-factory hook for URLs: event files at gs:// (and file://) URLs go through
    AppendFile (tensorstore, the GCS client orbax already uses) instead of tensorboardX's google-cloud-storage
    writer, which is not a dependency."""

    def open(self, path):
        return AppendFile(path)

    def directory_check(self, path):
        pass  # object stores have no directories


for _scheme in ("gs", "file"):
    record_writer.register_writer_factory(_scheme, _AppendFileFactory())


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
    """A string tensor for TensorBoard's text plugin, under `tag` itself (tensorboardX.summary.text appends
    "/text_summary" to the tag)."""
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        ),
        tensor=tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[text.encode()]),
    )


class TensorBoardWriter(MetricWriter):
    """A TensorBoard event file in `logdir` (local or URL): scalars and texts, encoded with tensorboardX's
    protobufs and TFRecord writer (no TensorFlow, no tensorboard)."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = os.fspath(logdir).rstrip("/")
        record_writer.directory_check(logdir)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.rskd"
        self.path = logdir + "/" + name
        self._w = record_writer.RecordWriter(self.path)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._w.write(event.SerializeToString())

    def write_scalars(self, step, scalars):
        values = [summary_pb2.Summary.Value(tag=k, simple_value=_scalar(v)) for k, v in scalars.items()]
        self._write(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        )

    def write_texts(self, step, texts):
        values = [_text_value(k, str(v)) for k, v in texts.items()]
        self._write(
            event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        )

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


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
