"""Putting host data on a (possibly multi-process) mesh without whole-array copies.

* `aligned_empty`: a 64-byte-aligned numpy buffer. XLA:CPU adopts such a buffer without copying it
  (`jax.device_put` is zero-copy), so a parameter filled on the host is not held twice.
* `put`: a host array -> a jax.Array with `sharding`. Works when the sharding spans devices of other processes
  (each process places only the shards its own devices hold; `jax.device_put` refuses such shardings).
* `from_reader`: builds a jax.Array shard by shard from a `read(index, out)` callback, so a stacked parameter
  read from a checkpoint never exists whole on the host; each process reads only its own shards.
* `gather`: a global jax.Array -> one numpy array on every process (one tensor at a time, for export).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is a multiple of 64 bytes."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def _aligned_copy(x: np.ndarray) -> np.ndarray:
    out = aligned_empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out


def _is_aligned(x: np.ndarray) -> bool:
    return x.flags.c_contiguous and x.ctypes.data % ALIGN == 0


def put(host: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """`host` as a jax.Array with `sharding` (default: the first local device).

    A single-device target adopts an aligned host buffer (no copy on CPU); a sharded target copies only the
    shards of this process's devices; a sharding over other processes' devices is fine (multi-host).
    """
    host = np.asarray(host)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if len(sharding.device_set) == 1 and sharding.is_fully_addressable:
        return jax.device_put(host if _is_aligned(host) else _aligned_copy(host), sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: _aligned_copy(host[idx]))


def from_reader(
    shape: tuple, dtype, sharding: jax.sharding.Sharding, read: Callable[[tuple, np.ndarray], None]
) -> jax.Array:
    """A jax.Array of `shape`/`dtype` with `sharding` whose shards are filled by `read(index, out)`.

    `index` is a tuple of slices into the global array and `out` an aligned buffer of that slice's shape;
    replicated shards are read once per process and shared between its devices.
    """
    cache: dict[tuple, np.ndarray] = {}

    def shard(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in cache:
            sub = tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))
            out = aligned_empty(sub, dtype)
            read(tuple(slice(*s.indices(n)) for s, n in zip(idx, shape)), out)
            cache[key] = out
        return cache[key]

    arr = jax.make_array_from_callback(tuple(shape), sharding, shard)
    cache.clear()
    return arr


def gather(x: jax.Array) -> np.ndarray:
    """The whole value of `x` on this process (a collective when `x` spans several processes)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # noqa: PLC0415 - only multi-process runs need it

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_placed(x, sharding: jax.sharding.Sharding) -> bool:
    """True when `x` is a jax.Array already laid out as `sharding` (nothing to move)."""
    return (
        isinstance(x, jax.Array)
        and isinstance(x.sharding, jax.sharding.Sharding)
        and x.sharding.is_equivalent_to(sharding, x.ndim)
    )
