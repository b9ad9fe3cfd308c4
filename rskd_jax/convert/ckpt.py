"""Our converted-checkpoint directory: orbax PyTree layout written array by array, and a reader for it
(and for the trainer's orbax checkpoints).

    DST/config.json     LlavaConfig.to_dict()
    DST/convert.json    provenance: source, format, dtype, LoRA config (kept adapters), ignored keys
    DST/state/          the model's parameter pure dict ({vision, projector, llm}) as an orbax checkpoint
    DST/tokenizer files

`state/` is what `orbax.checkpoint.StandardCheckpointer().restore(DST/'state', target)` reads (with any target
shardings). It is written without OCDBT: one zarr (v2, zstd) array per parameter, created up front at full
shape and filled chunk by chunk with tensorstore, so a stacked (scanned) parameter is written one layer slice
at a time and the whole model is never in memory. `_METADATA` is written last.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np
import tensorstore as ts

from rskd_jax.convert.errors import ConversionError
from rskd_jax.convert.keymap import path_name, row_blocks

CHUNK_BYTES = 32 * 2**20  # zarr chunk = conversion block (bench/convert.py: memory vs speed)
INFLIGHT_BYTES = 64 * 2**20  # blocks handed to tensorstore and not yet written
CONFIG, PROVENANCE, STATE = "config.json", "convert.json", "state"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    dtype: np.dtype
    stacked: bool  # leading axis = layers (written slice by slice)

    @property
    def inner(self) -> tuple:
        return self.shape[1:] if self.stacked else self.shape

    def blocks(self, target_bytes: int = CHUNK_BYTES) -> list[slice]:
        return row_blocks(self.inner, self.dtype.itemsize, target_bytes)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class CheckpointWriter:
    """Creates one zarr array per parameter under `state_dir` and writes row blocks into it asynchronously
    (at most INFLIGHT_BYTES pending), then `finish()` writes orbax's `_METADATA`."""

    def __init__(self, state_dir: pathlib.Path, params: dict[tuple, ParamSpec], compress: bool = True):
        self.dir, self.params = pathlib.Path(state_dir), params
        self.dir.mkdir(parents=True)
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2}})
        self.arrays, self._pending, self._pending_bytes = {}, collections.deque(), 0
        for path, spec in params.items():
            rows = spec.blocks()[0]
            chunk = [1] * spec.stacked + [max(1, rows.stop - rows.start), *spec.inner[1:]]
            meta = {
                "shape": list(spec.shape),
                "chunks": chunk,
                "dtype": _zarr_dtype(spec.dtype),
                "compressor": {"id": "zstd", "level": 1} if compress else None,
                "fill_value": None,
                "order": "C",
                "dimension_separator": ".",
            }
            self.arrays[path] = ts.open(
                {
                    "driver": "zarr",
                    "kvstore": {"driver": "file", "path": str(self.dir / path_name(path))},
                    "metadata": meta,
                },
                create=True,
                context=ctx,
            ).result()

    def write(self, path: tuple, layer: int | None, rows: slice, block: np.ndarray) -> None:
        """Starts writing `block` = rows `rows` of layer `layer` (None: unstacked) of param `path`."""
        arr = self.arrays[path]
        view = arr[layer] if layer is not None else arr
        block = np.ascontiguousarray(block)
        self._pending.append((view[rows].write(block), block.nbytes))
        self._pending_bytes += block.nbytes
        while self._pending_bytes > INFLIGHT_BYTES:
            future, n = self._pending.popleft()
            future.result()
            self._pending_bytes -= n

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()
        tree = {
            str(tuple(map(str, p))): {
                "key_metadata": [{"key": str(k), "key_type": 2} for k in p],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": list(s.shape),
                },
            }
            for p, s in self.params.items()
        }
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        (self.dir / "_METADATA").write_text(json.dumps(meta))


class CheckpointReader:
    """Arrays of an orbax PyTree checkpoint directory (ours, or the trainer's OCDBT/zarr3 one), by key path.

    `prefix` selects a subtree (e.g. ('student',) of a training state); paths are given relative to it.
    Integer-like keys are matched as strings, as orbax stores them.
    """

    def __init__(self, state_dir: str | pathlib.Path, prefix: tuple = ()):
        self.dir = pathlib.Path(state_dir)
        meta_file = self.dir / "_METADATA"
        if not meta_file.is_file():
            raise ConversionError(f"{self.dir}: not an orbax checkpoint (no _METADATA)")
        meta = json.loads(meta_file.read_text())
        self.use_ocdbt, self.use_zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
        self.keys: dict[tuple, str] = {}
        for entry in meta["tree_metadata"].values():
            key = tuple(str(k["key"]) for k in entry["key_metadata"])
            self.keys[key] = ".".join(key)
        self.prefix = tuple(map(str, prefix))
        self._open: dict[tuple, Any] = {}

    def find(self, path: tuple) -> tuple | None:
        """The stored key of our param `path` (also accepting an nnx State's trailing 'value'), or None."""
        key = self.prefix + tuple(map(str, path))
        for k in (key, key + ("value",)):
            if k in self.keys:
                return k
        return None

    def array(self, path: tuple):
        key = self.find(path)
        if key is None:
            raise ConversionError(f"{self.dir}: checkpoint has no array {'/'.join(map(str, path))}")
        if key not in self._open:
            name = self.keys[key]
            driver = "zarr3" if self.use_zarr3 else "zarr"
            kv = (
                {"driver": "ocdbt", "base": f"file://{self.dir}/", "path": name}
                if self.use_ocdbt
                else {"driver": "file", "path": str(self.dir / name)}
            )
            try:
                self._open[key] = ts.open({"driver": driver, "kvstore": kv}, open=True).result()
            except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
                raise ConversionError(f"{self.dir}: cannot open array {name}: {e}") from e
        return self._open[key]

    def spec(self, path: tuple, stacked: bool) -> ParamSpec:
        a = self.array(path)
        return ParamSpec(tuple(a.shape), np.dtype(a.dtype.numpy_dtype), stacked)

    def read(self, path: tuple, layer: int | None = None, rows: slice = slice(None)) -> np.ndarray:
        a = self.array(path)
        view = a[layer] if layer is not None else a
        try:
            return view[rows].read().result()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{self.dir}: cannot read {'/'.join(map(str, path))}: {e}") from e

    def read_into(self, path: tuple, index: tuple, out: np.ndarray, block_bytes: int = CHUNK_BYTES) -> None:
        """Reads `array[index]` (a tuple of slices) into `out`, cast to out's dtype, `block_bytes` at a time
        (a stacked parameter's shard is read without a second whole copy on the host)."""
        try:
            _copy_blocks(self.array(path)[index], out, block_bytes)
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
            raise ConversionError(f"{self.dir}: cannot read {'/'.join(map(str, path))}: {e}") from e


def _copy_blocks(view, out: np.ndarray, budget: int) -> None:
    if out.nbytes <= budget or out.ndim <= 1:
        out[...] = np.asarray(view.read().result()).astype(out.dtype, copy=False)
        return
    row = out[0].nbytes
    if row > budget:
        for i in range(out.shape[0]):
            _copy_blocks(view[view.domain[0].inclusive_min + i], out[i], budget)
        return
    step = max(1, budget // row)
    lo = view.domain[0].inclusive_min
    for i in range(0, out.shape[0], step):
        j = min(out.shape[0], i + step)
        out[i:j] = np.asarray(view[lo + i : lo + j].read().result()).astype(out.dtype, copy=False)


def is_checkpoint(path: pathlib.Path) -> bool:
    """An rskd-jax converted checkpoint directory (config.json of ours + state/_METADATA)."""
    path = pathlib.Path(path)
    if not (path / STATE / "_METADATA").is_file() or not (path / CONFIG).is_file():
        return False
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "vision" in cfg and "text" in cfg


def read_provenance(path: pathlib.Path) -> dict:
    f = pathlib.Path(path) / PROVENANCE
    return json.loads(f.read_text()) if f.is_file() else {}
