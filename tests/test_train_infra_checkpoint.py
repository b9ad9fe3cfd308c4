"""Checkpointer: round trip of nnx model + optax state + RNG key + Grain iterator, mesh restore, keep-N/best,
corrupt-checkpoint fallback, mismatch errors."""

import errno
import glob
import json
import logging
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rskd_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CorruptCheckpointError,
    is_read_error,
    restore_target,
)

INIT = nnx.initializers.lecun_normal()


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(INIT, ("fsdp", "tensor")), rngs=rngs)
        self.down = nnx.Linear(16, 4, kernel_init=nnx.with_partitioning(INIT, ("tensor", "fsdp")), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def make_model_and_opt():
    model = Toy(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


def make_iter():
    return iter(grain.MapDataset.range(64).seed(1).shuffle().batch(4).to_iter_dataset())


def key_data(x):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.fixture(scope="module")
def trained(mesh):
    """A sharded toy model after 2 AdamW steps (non-trivial optimizer moments) and a split RNG key."""
    with jax.set_mesh(mesh):
        model, opt = make_model_and_opt()

        @nnx.jit
        def step(model, opt, x):
            loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
            opt.update(model, g)
            return loss

        for i in range(2):
            step(model, opt, jnp.full((4, 8), 0.1 * (i + 1)))
    return {"nn": nnx.state((model, opt)), "key": jax.random.split(jax.random.key(3), 2), "step": 2}


def abstract_state(mesh):
    with jax.set_mesh(mesh):
        am, ao = nnx.eval_shape(make_model_and_opt)  # shardings on an AbstractMesh (env-probe gotcha)
    return {
        "nn": nnx.state((am, ao)),
        "key": jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 2)),
        "step": 0,
    }


def test_round_trip_state_iterator_config_and_mesh_restore(tmp_path, mesh, trained):
    it = make_iter()
    for _ in range(3):
        next(it)
    cfg = ml_collections.ConfigDict({"lr": 1e-2, "mesh": (2, 2, 2), "preset": "demo"})
    ck = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    assert ck.save(
        2,
        trained,
        data_iter=it,
        config=cfg,
        meta={"teacher": "t0", "fingerprint": "abc"},
        metrics={"loss": jnp.float32(1.5)},
    )
    expected_next = next(it)  # advancing after the (async) save must not change what was saved
    ck.wait()
    assert ck.latest_step() == 2 and os.path.exists(tmp_path / "ckpt" / "2" / "commit_success.txt")

    # (a) onto a 2x2x2 mesh with explicit target shardings rebuilt from the abstract (AbstractMesh) state
    it2 = make_iter()
    r = ck.restore(restore_target(abstract_state(mesh), mesh), data_iter=it2)
    assert r.step == 2 and r.meta == {"teacher": "t0", "fingerprint": "abc"} and r.metrics == {"loss": 1.5}
    assert r.config == {"lr": 1e-2, "mesh": [2, 2, 2], "preset": "demo"}
    np.testing.assert_array_equal(next(it2), expected_next)
    got, want = jax.tree.leaves(r.state), jax.tree.leaves(trained)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(key_data(a), key_data(b))
    assert jax.dtypes.issubdtype(r.state["key"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(r.state["key"]) == jax.random.key_impl(trained["key"])
    kernel = r.state["nn"][0]["up"]["kernel"][...]
    assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.mesh.shape == mesh.shape
    assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (4, 8)  # really split over fsdp x tensor
    # the restored state drives a model again
    with jax.set_mesh(mesh):
        am, ao = nnx.eval_shape(make_model_and_opt)
    nnx.update((am, ao), r.state["nn"])
    np.testing.assert_array_equal(
        np.asarray(am.down.kernel[...]), np.asarray(trained["nn"][0]["down"]["kernel"][...])
    )

    # (b) onto a single device from plain ShapeDtypeStructs without shardings
    plain = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, abstract_state(mesh)
    )
    r1 = ck.restore(restore_target(plain))
    leaf = r1.state["nn"][0]["up"]["kernel"][...]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(trained["nn"][0]["up"]["kernel"][...]))
    ck.close()


def test_target_without_concrete_sharding_is_rejected(tmp_path, mesh, trained):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, trained)
        with pytest.raises(ValueError, match="restore_target"):
            ck.restore(abstract_state(mesh))  # AbstractMesh shardings


def test_mismatch_lists_keys_and_is_not_treated_as_corruption(tmp_path, mesh):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)})
    ck.save(2, {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)})
    target = restore_target(
        {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32), "c": jax.ShapeDtypeStruct((3,), jnp.float32)}
    )
    with pytest.raises(CheckpointMismatchError) as e:
        ck.restore_latest_valid(target)
    msg = str(e.value)
    assert (
        str(tmp_path / "2") in msg
        and "'c'" in msg
        and "'b'" in msg
        and "w: checkpoint (4, 3) vs target (4, 5)" in msg
    )
    assert ck.all_steps() == [1, 2] and not glob.glob(str(tmp_path / "*.corrupt*"))
    with pytest.raises(CheckpointMismatchError, match="no 'data' item"):
        ck.restore(
            restore_target(
                {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
            ),
            data_iter=make_iter(),
        )
    ck.close()


def test_keep_latest_n_and_metrics_in_meta(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 3.0, 4: 4.0, 5: 6.0}
    ck = Checkpointer(tmp_path, max_to_keep=2)
    for s, loss in losses.items():
        ck.save(s, {"w": jnp.full((2,), float(s))}, metrics={"loss": loss})
    ck.wait()
    assert ck.all_steps() == [4, 5]
    assert not ck.save(5, {"w": jnp.zeros(2)}, metrics={"loss": 0.0})  # existing step: skipped
    ck.close()
    ck = Checkpointer(tmp_path, max_to_keep=2)  # a restart keeps counting the steps on disk
    ck.save(6, {"w": jnp.zeros(2)}, metrics={"loss": 7.0})
    ck.wait()
    assert ck.all_steps() == [5, 6]
    r = ck.restore(restore_target({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}), 5)
    np.testing.assert_array_equal(np.asarray(r.state["w"]), [5.0, 5.0])
    assert r.metrics == {"loss": 6.0}
    ck.close()


def _corrupt(step_dir, how):
    if how == "no_commit_marker":
        os.remove(os.path.join(step_dir, "commit_success.txt"))
    elif how == "truncated_arrays":
        files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    elif how == "overwritten_arrays":  # what the issue met: every array data file overwritten, sizes kept
        files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
        assert files
        for f in files:
            with open(f, "r+b") as fh:
                fh.write(b"\0" * os.path.getsize(f))
    elif how == "flipped_byte":  # silent damage: reads without error, values differ (caught by the checksums)
        (f,) = [f for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")) if big(f)]
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            b = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([b[0] ^ 0x10]))
    elif how == "garbage_metadata":
        with open(os.path.join(step_dir, "state", "_METADATA"), "w") as fh:
            fh.write("{not json")
    elif how == "garbage_iterator_state":
        with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as fh:
            fh.write("\x00garbage")


def big(f):
    return os.path.getsize(f) > 20000


def w_at(s):  # incompressible values: zstd stores them raw, so a flipped byte decodes without an error
    return jax.random.normal(jax.random.key(s), (3, 2000))


@pytest.mark.parametrize(
    "how",
    [
        "no_commit_marker",
        "truncated_arrays",
        "overwritten_arrays",
        "flipped_byte",
        "garbage_metadata",
        "garbage_iterator_state",
    ],
)
def test_corrupt_newest_falls_back_to_previous(tmp_path, how, caplog):
    ck = Checkpointer(tmp_path, max_to_keep=3)
    it = make_iter()
    batches_at = {}
    for s in (1, 2):
        next(it)
        ck.save(s, {"w": w_at(s), "key": jax.random.key(s)}, data_iter=it)
        batches_at[s] = next(make_iter_at(s))
    ck.close()
    _corrupt(str(tmp_path / "2"), how)

    ck = Checkpointer(tmp_path, max_to_keep=3)
    target = restore_target(
        {"w": jax.ShapeDtypeStruct((3, 2000), jnp.float32), "key": jax.eval_shape(lambda: jax.random.key(0))}
    )
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / "2")) as err:
        ck.restore(target, 2, data_iter=make_iter())
    if how == "flipped_byte":
        assert "checksums recorded" in str(err.value) and "['w']" in str(err.value)
    it2 = make_iter()
    with caplog.at_level(logging.WARNING, logger="rskd_jax.train.checkpoint"):
        r = ck.restore_latest_valid(target, data_iter=it2)
    assert r is not None and r.step == 1
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.asarray(w_at(1)))
    np.testing.assert_array_equal(key_data(r.state["key"]), key_data(jax.random.key(1)))
    np.testing.assert_array_equal(next(it2), batches_at[1])
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(str(tmp_path / "2") in w and "falling back" in w for w in warnings), warnings
    assert os.path.isdir(tmp_path / "2.corrupt") and not os.path.exists(
        tmp_path / "2"
    )  # set aside, not deleted
    assert ck.all_steps() == [1]
    ck.save(2, {"w": jnp.zeros((3, 2000)), "key": jax.random.key(0)})  # the step number is free again
    ck.close()


def test_no_readable_step_lists_every_step_and_why(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    for s in (1, 2):
        ck.save(s, {"w": w_at(s)})
    ck.close()
    _corrupt(str(tmp_path / "2"), "overwritten_arrays")
    _corrupt(str(tmp_path / "1"), "no_commit_marker")
    ck = Checkpointer(tmp_path)
    with pytest.raises(CorruptCheckpointError) as e:
        ck.restore_latest_valid(restore_target({"w": jax.ShapeDtypeStruct((3, 2000), jnp.float32)}))
    msg = str(e.value)
    assert "tried steps [2, 1]" in msg and "step 2: checkpoint" in msg and "ValueError" in msg
    assert "step 1: checkpoint" in msg and "missing commit marker" in msg
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing to fall back to: left where they are
    ck.close()


def test_read_errors_are_recognised_by_type_and_cause_not_words():
    def raised_from(inner, outer=Exception("Encountered error while reading array index")):
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e

    assert is_read_error(raised_from(ValueError("OUT_OF_RANGE: byte range")))  # orbax wrapping tensorstore
    assert is_read_error(raised_from(json.JSONDecodeError("x", "{", 0)))
    assert is_read_error(raised_from(OSError(errno.EIO, "I/O error")))
    assert not is_read_error(Exception("DATA_LOSS Error reading Unexpected end"))  # words alone mean nothing
    assert not is_read_error(raised_from(PermissionError(errno.EACCES, "denied")))  # fix access, keep step
    assert not is_read_error(raised_from(ConnectionError("reset")))  # transient: keep the step
    assert not is_read_error(raised_from(TypeError("a bug")))
    assert not is_read_error(CheckpointMismatchError("shapes"))


def make_iter_at(n):
    it = make_iter()
    for _ in range(n):
        next(it)
    return it


def test_no_checkpoint_means_fresh_start(tmp_path):
    with Checkpointer(tmp_path / "empty") as ck:
        assert ck.latest_step() is None
        assert ck.restore_latest_valid(restore_target({"w": jax.ShapeDtypeStruct((1,), jnp.float32)})) is None
        with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
            ck.restore(restore_target({"w": jax.ShapeDtypeStruct((1,), jnp.float32)}))
