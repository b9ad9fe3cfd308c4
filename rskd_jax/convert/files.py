"""Lazy tensor files: safetensors (own header reader, memory-mapped views), torch `.bin` (mmap, weights only),
weight sets of HF directories (single file or sharded with an index), and a streaming safetensors writer.

Nothing here reads a whole checkpoint: a tensor is a memory map of its bytes in the file (file-backed pages,
released when the view is dropped), so host memory holds at most the tensors being converted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import mmap
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from rskd_jax.convert.errors import ConversionError, listing

ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SafetensorsFile:
    """Header-only open of a .safetensors file; `get(key)` is a read-only memory map of that tensor.

    Validates the header against the file size, so a truncated or corrupt file fails here, naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        bad = lambda why: ConversionError(f"{self.path}: not a valid safetensors file ({why})")
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise bad(f"header length {n} but the file has {size} bytes: truncated or corrupt")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise bad(f"unreadable JSON header: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start, data_size = 8 + n, size - 8 - n
        self._info: dict[str, tuple[TensorInfo, int]] = {}
        for key, h in header.items():
            try:
                dtype, shape, (b, e) = ST_DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise bad(f"tensor {key!r} has an unsupported or malformed entry {h!r}") from err
            info = TensorInfo(shape, dtype)
            if e - b != info.nbytes or b < 0:
                raise bad(f"tensor {key!r}: offsets [{b}, {e}) do not fit shape {shape} {dtype}")
            if e > data_size:
                raise ConversionError(
                    f"{self.path}: truncated safetensors file: tensor {key!r} needs data bytes [{b}, {e}) "
                    f"but the file holds {data_size}"
                )
            self._info[key] = (info, b)

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key][0]

    def get(self, key: str) -> np.ndarray:
        info, begin = self._info[key]
        if info.nbytes == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(self.path, info.dtype, "r", self.data_start + begin, info.shape)

    def close(self) -> None:
        pass


class TorchFile:
    """A `pytorch_model*.bin` state dict opened with torch.load(weights_only=True, mmap=True).

    Tensors stay in the memory-mapped file; `get` returns a numpy view (bfloat16 via ml_dtypes).
    `close()` drops the mapping (pages are released).
    """

    def __init__(self, path: str | os.PathLike):
        import torch  # only .bin checkpoints need torch

        self.path = pathlib.Path(path)
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise ConversionError(f"{self.path}: cannot read this torch checkpoint: {e}") from e
            sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure is a bad input file
            raise ConversionError(
                f"{self.path}: cannot read this torch checkpoint: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(sd, dict):
            raise ConversionError(f"{self.path}: expected a state dict, found a {type(sd).__name__}")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConversionError(
                f"{self.path}: not a flat state dict of tensors (entries {bad[:5]} are not tensors; a nested "
                "training checkpoint must be reduced to its model state dict first)"
            )
        self._sd = sd
        self._torch = torch

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, key: str) -> TensorInfo:
        t = self._sd[key]
        return TensorInfo(tuple(t.shape), torch_to_numpy_dtype(t.dtype))

    def get(self, key: str) -> np.ndarray:
        t = self._sd[key]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def close(self) -> None:
        self._sd = {}


def torch_to_numpy_dtype(dtype) -> np.dtype:
    name = str(dtype).removeprefix("torch.")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def open_tensor_file(path: pathlib.Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one source tensor lives: file + key, with its shape and dtype (from the header)."""

    file: pathlib.Path
    key: str
    info: TensorInfo


class WeightSet:
    """The tensors of one checkpoint (a directory or a single file): key -> TensorRef, from headers only.

    A directory is read as, in order of preference: `model.safetensors.index.json` (sharded), `*.safetensors`,
    `pytorch_model.bin.index.json`, `*.bin`. `names` restricts a directory to the first of those file names
    that exists (e.g. `adapter_model.safetensors`). Missing shards and index/file disagreements are errors
    naming the files.
    """

    def __init__(self, path: str | os.PathLike, names: tuple[str, ...] | None = None):
        self.path = pathlib.Path(path)
        self.files = find_weight_files(self.path, names)
        self.refs: dict[str, TensorRef] = {}
        for f, keys in self.files.items():
            tf = open_tensor_file(f)
            have = tf.keys()
            if keys is not None:
                missing = sorted(set(keys) - set(have))
                extra = sorted(set(have) - set(keys))
                if missing or extra:
                    parts = [
                        listing("keys listed in the index but absent", missing, 8),
                        listing("keys present but not in the index", extra, 8),
                    ]
                    raise ConversionError(
                        f"{f}: does not match its index file: " + "; ".join(p for p in parts if p)
                    )
            for k in have:
                if k in self.refs:
                    raise ConversionError(f"tensor {k!r} is in both {self.refs[k].file} and {f}")
                self.refs[k] = TensorRef(f, k, tf.info(k))
            tf.close()

    @property
    def nbytes(self) -> int:
        return sum(r.info.nbytes for r in self.refs.values())


class Reader:
    """Reads TensorRefs, keeping each file open until `release(file)` (a .bin shard stays mapped)."""

    def __init__(self):
        self._open: dict[pathlib.Path, object] = {}

    def get(self, ref: TensorRef) -> np.ndarray:
        tf = self._open.get(ref.file)
        if tf is None:
            tf = self._open[ref.file] = open_tensor_file(ref.file)
        return tf.get(ref.key)

    def release(self, file: pathlib.Path | None = None) -> None:
        for f in [file] if file is not None else list(self._open):
            tf = self._open.pop(f, None)
            if tf is not None:
                tf.close()


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_weight_files(path: pathlib.Path, names=None) -> dict[pathlib.Path, list[str] | None]:
    """{file: keys from the index (or None when unindexed)} for a checkpoint directory or a single file."""
    if path.is_file():
        return {path: None}
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    if names is not None:
        found = {path / n: None for n in names if (path / n).is_file()}
        if not found:
            raise ConversionError(f"{path}: none of {list(names)} found")
        return dict(list(found.items())[:1])
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: unreadable index file ({type(e).__name__}: {e})") from e
        files: dict[pathlib.Path, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(path / fname, []).append(key)
        missing = [f"{f.name} ({len(k)} tensors)" for f, k in files.items() if not f.is_file()]
        if missing:
            raise ConversionError(f"{path}: shard files listed in {index_name} are missing: {missing}")
        return files
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return {f: None for f in found}
    raise ConversionError(
        f"{path}: no weights found (expected model.safetensors[.index.json], *.safetensors or "
        "pytorch_model*.bin)"
    )


# ----------------------------------------------------------------------------------------- safetensors writer
def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal for GB/MB/KB, binary for GiB/MiB/KiB)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor: the header is laid out first (shapes known), then each
    tensor is filled through a writable memory map of its byte range (`tensor(key)`), so only the block being
    written is in host memory."""

    def __init__(self, path: pathlib.Path, tensors: dict[str, TensorInfo], metadata: dict | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for key, info in tensors.items():
            header[key] = {
                "dtype": ST_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.tensors, self.start = path, tensors, 8 + len(raw)
        self._offsets = {k: header[k]["data_offsets"][0] for k in tensors}
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(self.start + offset)

    def tensor(self, key: str) -> np.ndarray:
        """A writable view of `key`'s bytes in the file (flush by deleting it, or call flush())."""
        info = self.tensors[key]
        if info.nbytes == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(self.path, info.dtype, "r+", self.start + self._offsets[key], info.shape)


def drop_pages(view: np.ndarray) -> None:
    """Flushes a writable memory map and tells the kernel its pages may go (keeps RSS to the live block)."""
    mm = getattr(view, "_mmap", None)
    if isinstance(mm, mmap.mmap):
        mm.flush()
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED)


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release_memory() -> None:
    """Returns freed heap memory to the OS (glibc keeps it otherwise: tensorstore's worker threads free
    chunk buffers into per-thread arenas, which would make the resident set grow with the model size)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
