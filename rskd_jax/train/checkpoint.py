"""Orbax checkpoints of a training run: state pytree, Grain iterator state, config and metadata.

One step directory, `<directory>/<step>/`, holds four items:

* `state`  - any pytree of arrays (nnx state of student + optimizer, step counter, RNG keys ...). Typed PRNG
             keys (`jax.random.key`) are stored as their raw key data and re-wrapped on restore.
* `data`   - the Grain iterator state (`grain.checkpoint.CheckpointSave`), one JSON file per process.
* `config` - the resolved config as JSON (an `ml_collections.ConfigDict`, a dataclass or a dict).
* `meta`   - JSON: caller metadata (teacher path/fingerprint, ...), the step's metrics and the save time.

Saving is asynchronous (`wait()` blocks until the last save is committed). The `max_to_keep` newest steps are
kept. Each save records a checksum of every array in `meta` (computed on device, see `array_checksums`), so a
restore detects array data that reads without error but is damaged. A save that fails (disk full, no
permission, bucket error) raises CheckpointSaveError saying what to fix; its partial directory is removed and
older steps are kept.

Restores always take an explicit abstract target (ShapeDtypeStructs with concrete shardings) so arrays land
where the caller wants them, never where they were saved (see `restore_target`). `restore_latest_valid`
walks back from the newest step and restores the newest readable one; newer unreadable ones are set aside
as `<step>.corrupt` with a warning. What counts as unreadable is decided by exception type along the cause
chain (`is_read_error`), never by message text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_managers

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEMS = ("state", "data", "config", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Errors that mean "these bytes cannot be read back" when raised (anywhere along the cause chain) while reading
# a step that passed the structural checks: tensorstore reports DATA_LOSS / OUT_OF_RANGE / FAILED_PRECONDITION
# ... as ValueError, json as JSONDecodeError (a ValueError), files as OSError / EOFError, zlib as zlib.error.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zlib.error)
# ... except these: a network hiccup or a permission problem is not damage (setting the step aside would be wrong).
_NOT_DAMAGE = (ConnectionError, TimeoutError, PermissionError, InterruptedError)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_read_error(e: BaseException) -> bool:
    """True when `e` (or an exception it was raised from) says the stored bytes are unreadable."""
    chain = list(_chain(e))
    if any(isinstance(c, (_NOT_DAMAGE, CheckpointMismatchError, MemoryError)) for c in chain):
        return False
    return any(isinstance(c, _READ_ERRORS) for c in chain)


def _root_cause(e: BaseException) -> str:
    """`Type: message` of the innermost exception of the chain (the one that says what went wrong)."""
    *_, last = _chain(e)
    return f"{type(last).__name__}: {str(last)[:400]}"


class CheckpointError(Exception):
    """Base class of the checkpoint errors below."""


class CorruptCheckpointError(CheckpointError):
    """A step directory is incomplete or unreadable (missing commit marker, truncated or garbage files)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint is readable but does not fit the restore target (keys, shapes, missing items)."""


class CheckpointSaveError(CheckpointError):
    """Writing a step failed (disk full, permission, bucket error); the partial step was removed."""


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns. `meta` is the caller's metadata dict; `config` a plain dict."""

    state: Any
    meta: dict
    config: dict | None
    step: int
    metrics: dict | None


def restore_target(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Turns arrays / ShapeDtypeStructs into restore targets with CONCRETE shardings.

    * a NamedSharding (also one on an AbstractMesh, as `nnx.eval_shape` under `jax.set_mesh` gives) is rebuilt
      on `mesh` with the same PartitionSpec;
    * a leaf without a sharding becomes replicated on `mesh`, or lands on the first local device if `mesh`
      is None;
    * other concrete shardings are kept; non-array leaves (Python scalars) pass through.
    """

    def convert(x):
        if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            return x
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and mesh is not None:
            sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
        elif sharding is None:
            sharding = (
                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(convert, tree)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys -> raw uint32 key data (orbax cannot serialise key dtypes)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_data_target(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # the key-data dims are trailing and unsharded
        extra = (None,) * (len(data.shape) - len(x.shape))
        sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, *extra)
        )
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _wrap_keys(restored, target):
    if not any(_is_key(t) for t in jax.tree.leaves(target)):
        return restored

    def wrap(x, t):
        return jax.random.wrap_key_data(x, impl=t.dtype._impl) if _is_key(t) else x

    return jax.tree.map(wrap, restored, target)


def _check_target(target) -> None:
    unsharded = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
        if isinstance(x, jax.ShapeDtypeStruct)
        and (x.sharding is None or isinstance(getattr(x.sharding, "mesh", None), jax.sharding.AbstractMesh))
    ]
    if unsharded:
        raise ValueError(
            f"restore target leaves need concrete shardings (none, or an AbstractMesh, at "
            f"{unsharded[:8]}{' ...' if len(unsharded) > 8 else ''}); build the target with "
            "rskd_jax.train.checkpoint.restore_target(tree, mesh)"
        )


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _leaf_checksum(x) -> jax.Array:
    """A uint32 hash of an array's bits: sum over elements of (bits ^ golden*i) * (2i+1) mod 2**32. Each term
    is a bijection of one element's bits, so any single changed element changes the sum; integer sums are
    exact in any order, so the value does not depend on the sharding or the reduction order."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    bits = bits.ravel()
    i = jnp.arange(bits.size, dtype=jnp.uint32)
    return jnp.sum((bits ^ (i * jnp.uint32(0x9E3779B9))) * (2 * i + 1), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda xs: [_leaf_checksum(x) for x in xs])


def array_checksums(tree) -> dict[str, list]:
    """`{keystr(path): [dtype, uint32 checksum]}` of the array leaves of `tree` (one jitted pass, on device)."""
    flat = [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(x, (jax.Array, np.ndarray)) and x.dtype.kind in "biuf"
    ]
    if not flat:
        return {}
    sums = jax.device_get(_checksums_jit([x for _, x in flat]))
    return {k: [str(x.dtype), int(v)] for (k, x), v in zip(flat, sums, strict=True)}


def _config_to_json(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict / FrozenConfigDict
        return json.loads(config.to_json_best_effort())
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"config must be a ConfigDict, dataclass or mapping, got {type(config).__name__}")


def _metrics_to_json(metrics) -> dict | None:
    return None if metrics is None else {k: float(np.asarray(v)) for k, v in metrics.items()}


def _is_primary() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """Async orbax checkpoints of (state, data iterator, config, meta) in `directory/<step>/`.

    Args:
      directory: where step directories go (local path or gs://...). Created if missing.
      max_to_keep: how many of the newest steps to keep (None keeps all).
      save_interval_steps: `save` is a no-op on other steps unless `force=True`.
      async_save: commit in a background thread (orbax async checkpointing).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        self.directory = epath.Path(directory)
        import grain  # local import: grain is heavy-ish and only needed here

        self._grain = grain
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # partial steps of a run killed mid-save
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step whose async save has not been confirmed yet
        self._failed: int | None = None  # the step whose save failed (its writer threads may still run)

    # ----------------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter=None,
        config=None,
        meta: Mapping | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `step` (returns before the commit when async). False if skipped.

        Skipped when `step` is already saved or (unless `force`) is off the save interval. `metrics` are
        scalars (host or device) stored with the step in its `meta` record.
        """
        step = int(step)
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
            return False
        metrics = _metrics_to_json(metrics)
        storable = _keys_to_data(state)
        record = {"meta": dict(meta or {}), "metrics": metrics, "step": step, "saved_unix": time.time()}
        record["checksums"] = array_checksums(storable)
        items = {"state": ocp.args.StandardSave(storable), "meta": ocp.args.JsonSave(record)}
        if data_iter is not None:
            if not hasattr(data_iter, "get_state"):
                raise TypeError(
                    f"data_iter must be a Grain iterator with get_state/set_state, got "
                    f"{type(data_iter).__name__}"
                )
            items["data"] = self._grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_config_to_json(config))
        self.wait()  # orbax waits for the previous save here anyway; this reports its failure as its own
        with self._save_errors(step):
            saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._pending = step
            log.info("saving checkpoint step %d to %s", step, self.directory)
        return bool(saved)

    @contextlib.contextmanager
    def _save_errors(self, step: int):
        """Turns any failure of a save (this one, or the previous async one surfacing now) into a
        CheckpointSaveError naming the directory and what to free or fix; removes the partial step."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of a write is reported the same way
            self._pending, self._failed = None, step
            raise CheckpointSaveError(self._save_failure_message(step, e)) from e

    def _save_failure_message(self, step: int, e: BaseException) -> str:
        for wait in (
            self._mngr.wait_until_finished,
            self._mngr._non_blocking_metadata_store.wait_until_finished,
        ):
            with contextlib.suppress(
                Exception
            ):  # let the failed save's other writers stop before cleaning up
                wait()
        removed = [p.name for p in self.directory.glob(f"{step}{TMP_SUFFIX}*")] if _is_primary() else []
        for name in removed:
            _remove(self.directory / name)
        self._mngr.reload()
        kept = self.all_steps()
        codes = {getattr(c, "errno", None) for c in _chain(e)}
        if codes & {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}:
            fix = f"free disk space (or quota) where {self.directory} lives, or use a --workdir with room"
        elif codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
            fix = f"make {self.directory} writable by this user (or use another --workdir)"
        else:
            fix = (
                f"check that {self.directory} has free space and is writable (for gs:// the bucket exists, "
                "this account may write to it and the quota is not exhausted)"
            )
        return (
            f"saving checkpoint step {step} to {self.directory} failed ({_root_cause(e)}); "
            f"{'removed the partial ' + ', '.join(removed) + '; ' if removed else ''}"
            f"the previous checkpoints are kept (steps {kept}). To continue: {fix}, then rerun the same "
            f"command: it resumes from step {kept[-1] if kept else 0}."
        )

    # ----------------------------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -------------------------------------------------------------------------------------------- restore
    def restore(self, abstract_state: Any, step: int | None = None, *, data_iter=None) -> Restored:
        """Restores `step` (default: the latest) into `abstract_state`'s shapes and shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with concrete shardings (see `restore_target`);
        typed PRNG-key leaves come back as keys. With `data_iter`, its state is set to the saved one so it
        continues with the next batch. Raises CorruptCheckpointError for unreadable / incomplete steps and
        CheckpointMismatchError when the checkpoint does not fit the target.
        """
        self._mngr.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint steps in {self.directory}")
        _check_target(abstract_state)
        storable = jax.tree.map(lambda x: _key_data_target(x) if _is_key(x) else x, abstract_state)
        saved_items = self._validate(step, storable, want_data=data_iter is not None)
        items = {"state": ocp.args.StandardRestore(storable), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = self._grain.checkpoint.CheckpointRestore(data_iter)
        if "config" in saved_items:
            items["config"] = ocp.args.JsonRestore()
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - classified by type along the cause chain
            if is_read_error(e):
                raise CorruptCheckpointError(
                    f"checkpoint {self.step_dir(step)} is unreadable ({_root_cause(e)})"
                ) from e
            raise
        meta = out["meta"] or {}
        _verify(self.step_dir(step), out["state"], meta.get("checksums"))
        return Restored(
            state=_wrap_keys(out["state"], abstract_state),
            meta=meta.get("meta", {}),
            config=out["config"] if "config" in saved_items else None,
            step=int(step),
            metrics=meta.get("metrics"),
        )

    def restore_latest_valid(self, abstract_state: Any, *, data_iter=None) -> Restored | None:
        """Restores the newest readable step; corrupt / incomplete newer ones are set aside with a WARNING.

        Returns None when there is no checkpoint, i.e. the run starts fresh. Raises CorruptCheckpointError
        listing every step tried and why it failed when there are steps but none is readable (they are left in
        place). A step that does not fit the target (CheckpointMismatchError) is a configuration error and is
        raised, not skipped.
        """
        self.wait()
        failed: list[tuple[int, CorruptCheckpointError]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = self.restore(abstract_state, step, data_iter=data_iter)
            except CorruptCheckpointError as e:
                failed.append((step, e))
                log.warning("checkpoint step %d cannot be used: %s", step, e)
                continue
            for bad, e in failed:
                aside = self._set_aside(bad)
                log.warning(
                    "checkpoint %s is corrupt or incomplete (%s); moved it to %s and falling back to "
                    "the previous checkpoint (step %d)",
                    self.step_dir(bad),
                    e,
                    aside,
                    step,
                )
            return restored
        if failed:  # nothing is moved: there is no good step to fall back to, the user decides
            tried = "; ".join(f"step {s}: {e}" for s, e in failed)
            raise CorruptCheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps {[s for s, _ in failed]}): {tried}. "
                f"Restore them from a copy, or move {self.directory} away to start this stage from scratch."
            )
        return None

    def _validate(self, step: int, storable, *, want_data: bool) -> set[str]:
        """Checks step completeness and target fit before reading any array data; returns saved item names."""
        d = self.step_dir(step)
        if not d.exists():
            raise FileNotFoundError(f"checkpoint {d} does not exist (steps: {self.all_steps()})")
        if not (d / COMMIT_MARKER).exists():
            raise CorruptCheckpointError(
                f"checkpoint {d} is incomplete: missing commit marker {COMMIT_MARKER}"
            )
        try:
            saved = set(json.loads((d / STEP_METADATA).read_text())["item_handlers"])
        except Exception as e:  # noqa: BLE001
            if not is_read_error(e):
                raise
            raise CorruptCheckpointError(
                f"checkpoint {d}: unreadable {STEP_METADATA} ({type(e).__name__}: {e})"
            ) from e
        missing = [i for i in ("state", "meta") if i not in saved] + [
            i for i in saved if not (d / i).exists()
        ]
        if missing:
            raise CorruptCheckpointError(
                f"checkpoint {d} is incomplete: missing items {missing} "
                f"(expected directories {sorted(saved | {'state', 'meta'})})"
            )
        if want_data and "data" not in saved:
            raise CheckpointMismatchError(
                f"checkpoint {d} has no 'data' item (it was saved without a data "
                f"iterator) but a data_iter was given to restore"
            )
        try:
            tree = self._mngr.item_metadata(step)["state"].tree
        except Exception as e:  # noqa: BLE001
            if not is_read_error(e):
                raise
            raise CorruptCheckpointError(
                f"checkpoint {d}: unreadable state metadata ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        _compare(d, ocp.tree.to_flat_dict(tree), ocp.tree.to_flat_dict(storable))
        return saved

    def _set_aside(self, step: int) -> epath.Path:
        src = self.step_dir(step)
        dst = self.directory / f"{step}.corrupt"
        n = 0
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.corrupt.{n}"
        _barrier(f"rskd_ckpt_aside_{step}_start")
        if _is_primary():
            src.rename(dst)
        _barrier(f"rskd_ckpt_aside_{step}_done")
        self._mngr.reload()
        return dst

    # ------------------------------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Blocks until pending async saves are committed; raises CheckpointSaveError if one failed."""
        step = self._pending
        if step is None:
            self._mngr.wait_until_finished()
            return
        with self._save_errors(step):
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        self._pending = None

    def close(self) -> None:
        """Waits for the last save (raising CheckpointSaveError if it failed) and releases orbax's threads."""
        try:
            self.wait()
        finally:
            if self._failed is None:
                self._mngr.close()
            else:  # the failure was reported; now the failed save's last writers have stopped: clean up again
                with contextlib.suppress(Exception):
                    self._mngr.close()
                if _is_primary():
                    for p in self.directory.glob(f"{self._failed}{TMP_SUFFIX}*"):
                        _remove(p)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps in a checkpoint directory, oldest first, read from the directory listing (orbax
    writes the commit marker last; set-aside `<step>.corrupt` and partial steps are not counted). Opens no
    checkpoint and creates nothing: `[]` when the directory does not exist."""
    d = epath.Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / COMMIT_MARKER).is_file())


def _remove(path: epath.Path, tries: int = 10) -> None:
    """rmtree that outlasts a failed save's writer threads still creating files in `path` for a moment."""
    for i in range(tries):
        try:
            path.rmtree() if path.is_dir() else path.unlink()
        except OSError:
            time.sleep(0.05 * (i + 1))
        if not path.exists():
            return
    log.warning("could not remove the partial checkpoint %s; delete it by hand", path)


def _verify(d, state, recorded: dict | None) -> None:
    """Raises CorruptCheckpointError when restored arrays differ from the checksums recorded at save time
    (steps saved before checksums were recorded are not checked)."""
    if not recorded:
        return
    got = array_checksums(state)
    bad = [k for k, (dtype, v) in recorded.items() if k in got and got[k][0] == dtype and got[k][1] != v]
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {d}: the array data read back differs from the checksums recorded when it was saved "
            f"(damaged files) for {len(bad)} of {len(recorded)} arrays: {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )


def _compare(d, saved: dict, target: dict) -> None:
    """Raises CheckpointMismatchError listing missing / unexpected keys and shape mismatches."""
    name = lambda k: "/".join(map(str, k))  # noqa: E731
    only_saved = sorted(name(k) for k in saved.keys() - target.keys())
    only_target = sorted(name(k) for k in target.keys() - saved.keys())
    shapes = []
    for k in sorted(saved.keys() & target.keys(), key=name):
        want = getattr(target[k], "shape", None)
        have = getattr(saved[k], "shape", None)
        if want is not None and have is not None and tuple(want) != tuple(have):
            shapes.append(f"{name(k)}: checkpoint {tuple(have)} vs target {tuple(want)}")
    if only_saved or only_target or shapes:
        parts = []
        if only_target:
            parts.append(f"keys in the target but not in the checkpoint: {only_target[:20]}")
        if only_saved:
            parts.append(f"keys in the checkpoint but not in the target: {only_saved[:20]}")
        if shapes:
            parts.append(f"shape mismatches: {shapes[:20]}")
        raise CheckpointMismatchError(
            f"checkpoint {d}/state does not match the restore target; " + "; ".join(parts)
        )
