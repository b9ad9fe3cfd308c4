"""Grain input pipeline: sources -> per-epoch global shuffle -> process shard -> epochs -> weighted mixture
-> transform (bad records raise or are skipped and counted) -> fixed-shape numpy batches -> worker
processes.

Order of one component (source i, seed s_i derived from `seed`):
    MapDataset.source(src).shuffle(s_i) -> _BatchBlocks(shard_index, shard_count, batch_size) -> .repeat(num_epochs)

`ShuffleMapDataset` reshuffles every epoch (index // len picks the epoch), and `_BatchBlocks` gives process i
the i-th block of `batch_size` records of every global batch of `batch_size * shard_count` in epoch e's
permutation: in every epoch the shards are disjoint and together cover every record exactly once, and with
one source the global batches are the same whatever the number of processes (a 2-process run sees the batches
of a 1-process run, within each epoch). Components are mixed with `MapDataset.mix` (deterministic
interleave by weight; the mixture ends when any finite component runs out). Batches are fixed-shape
dicts of numpy arrays (the batch contract in transforms.ExampleTransform), `drop_remainder` by default.

State: the iterator's `get_state()`/`set_state()` (also through `grain.checkpoint.CheckpointSave/Restore`
in an orbax `CheckpointManager`) resume exactly, provided the pipeline is rebuilt with the same
arguments, including `num_workers` (Grain batches inside each worker, so the batch composition depends on
the worker count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from rskd_jax.data.errors import BadRecords, DataError


class _Guarded:
    """Applies the transform; on `DataError` raises (default) or returns None after counting + logging."""

    def __init__(self, transform: Callable[[dict], dict], skip_bad_records: bool, with_metadata: bool):
        self.transform, self.with_metadata = transform, with_metadata
        self.bad = BadRecords(skip_bad_records, "pipeline")

    def __call__(self, item):
        source_id, example_id, record = item
        try:
            out = self.transform(record)
        except DataError as e:
            self.bad(e)
            return None
        if self.with_metadata:
            out = {**out, "example_id": np.int32(example_id), "source_id": np.int32(source_id)}
        return out


class _BatchBlocks(grain.MapDataset):
    """Process `index` of `count`'s share of each epoch: the `block` consecutive records it contributes to
    every global batch of `block * count` (process 0's rows first, as `host_local_to_global` assembles them).
    So within an epoch the global batches are the same for any number of processes (whole global batches;
    a last partial one is split in blocks too), and the processes' shares are disjoint and cover the epoch.
    Indices past one epoch reach the parent's next epoch (its next permutation), as SliceMapDataset does."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
        super().__init__(parent)
        self._n, self._i, self._block, self._global = len(parent), index, block, block * count
        full, rest = divmod(self._n, self._global)
        self._len = full * block + max(0, min(block, rest - index * block))
        if self._len == 0:
            raise ValueError(f"{self._n} records leave process {index} of {count} no record")

    def __len__(self) -> int:
        return self._len

    def _parent_index(self, k: int) -> int:
        epoch, j = divmod(k, self._len)
        return epoch * self._n + (j // self._block) * self._global + self._i * self._block + j % self._block

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            parent_index = self._parent_index(index)
        return self._parent[parent_index]

    def _getitems(self, indices):
        with self._stats.record_self_time(num_elements=len(indices)):
            parent = [self._parent_index(k) for k in indices]
        return self._parent._getitems(parent)  # noqa: SLF001 - grain's batched read protocol

    def __str__(self) -> str:
        return f"_BatchBlocks(process {self._i}, block {self._block}, global batch {self._global})"

    @property
    def _element_spec(self):
        return grain.experimental.get_element_spec(self._parent) if hasattr(grain, "experimental") else None


def _derive_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def default_shard() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count())."""
    import jax  # noqa: PLC0415 (rskd_jax.data imports no jax itself)

    return jax.process_index(), jax.process_count()


def make_dataset(
    sources: Sequence[Any] | Any,
    transform: Callable[[dict], dict],
    *,
    batch_size: int,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    skip_bad_records: bool = False,
    with_metadata: bool = False,
    read_threads: int = 4,
) -> grain.IterDataset:
    """Batched `grain.IterDataset` of this process's shard.

    Args:
      sources: one random-access source or a list of them (mixed with `weights`, default uniform).
      transform: record -> dict of fixed-shape arrays (e.g. `ExampleTransform`); `DataError` = bad record.
      batch_size: per-process batch size.
      seed: shuffle seed; the same on every process (global shuffle, then shard).
      num_epochs: None = repeat forever (training); 1 for evaluation.
      shard_index, shard_count: this process's shard; default `jax.process_index()/process_count()`.
      skip_bad_records: skip and count (logged) records whose transform raises `DataError`.
      with_metadata: add `example_id` (index in its source) and `source_id` (index in `sources`), int32 [B].
      read_threads: threads per process (per worker) reading and transforming elements.
    """
    if not isinstance(sources, (list, tuple)):
        sources = [sources]
    if shard_index is None or shard_count is None:
        shard_index, shard_count = default_shard()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
    comps = []
    for i, src in enumerate(sources):
        if len(src) < shard_count:
            raise ValueError(
                f"source {i} ({src!r}) has {len(src)} records, fewer than shard_count={shard_count}"
            )
        n = len(src)  # later epochs reach the source with index e * n + k
        ds = grain.MapDataset.source(src).map_with_index(lambda k, r, i=i, n=n: (i, k % n, r))
        if shuffle:
            ds = ds.shuffle(_derive_seed(seed, i))
        ds = _BatchBlocks(ds, shard_index, shard_count, batch_size) if shard_count > 1 else ds
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        comps.append(ds)
    if weights is not None and len(weights) != len(comps):
        raise ValueError(f"{len(weights)} weights for {len(comps)} sources")
    ds = grain.MapDataset.mix(comps, weights) if len(comps) > 1 else comps[0]
    ds = ds.map(_Guarded(transform, skip_bad_records, with_metadata))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size))
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def make_iterator(
    dataset: grain.IterDataset,
    num_workers: int = 0,
    per_worker_buffer_size: int = 2,
    own_memory: bool = False,
):
    """Iterator over `dataset` with `num_workers` worker processes (0 = in this process); its `get_state()`
    is what checkpoints store. Close it (`it.close()`) when done.

    With workers, batches arrive as arrays backed by shared memory; each block is freed when its batch is
    dropped. `own_memory=True` copies every batch into ordinary arrays instead (for callers that keep batches
    for the whole run: blocks still referenced at exit are reported as leaked). The copy costs the consumer
    process ~10 % of the pipeline's throughput on 2 cores (bench/input.py), so the default is off.
    """
    if num_workers > 0:
        _absl_flags_ready()
        opts = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=per_worker_buffer_size
        )
        dataset = dataset.mp_prefetch(opts)
        if own_memory:
            dataset = dataset.map(_own_memory)
    return iter(dataset)


def _absl_flags_ready() -> None:
    """Grain's worker processes read absl flags (e.g. --grain_enable_multiprocess_worker_profiling). Outside an
    absl app (a script, a notebook) nothing parsed them and the read raises UnparsedFlagAccessError: mark them
    parsed, i.e. at their defaults. Under absl.app.run they are parsed already and left alone."""

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _own_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in batch.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch to `batch_size` by repeating its last row; `example_id` of the padding
    rows is -1 (evaluators drop them)."""
    n = len(next(iter(batch.values())))
    if n == batch_size:
        return batch
    idx = np.minimum(np.arange(batch_size), n - 1)
    out = {k: v[idx] for k, v in batch.items()}
    if "example_id" in out:
        out["example_id"] = np.where(np.arange(batch_size) < n, out["example_id"], -1).astype(np.int32)
    return out


def eval_batches(
    source: Any,
    transform: Callable[[dict], dict],
    batch_size: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    skip_bad_records: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], list[dict]]]:
    """One unshuffled pass over this process's shard, in full batches (the last one padded, see
    `pad_batch`), each with the raw records of its real rows (`source[example_id]`: answers, classes,
    boxes...), in order."""
    ds = make_dataset(
        source,
        transform,
        batch_size=batch_size,
        shuffle=False,
        num_epochs=1,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder=False,
        skip_bad_records=skip_bad_records,
        with_metadata=True,
    )
    it = make_iterator(ds, num_workers)
    try:
        for batch in it:
            batch = pad_batch(batch, batch_size)
            yield batch, [source[int(k)] for k in batch["example_id"] if k >= 0]
    finally:
        if hasattr(it, "close"):
            it.close()
