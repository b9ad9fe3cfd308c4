"""A checkpoint save that fails (disk full, file too large): a clear CheckpointSaveError, the partial step removed,
the previous checkpoints intact and restorable, nothing that looks like a finished step.

Two write layers are made to fail: the Python one orbax writes its JSON / metadata / commit files through (an
injected OSError(ENOSPC)), and the kernel under tensorstore's C++ array writes (RLIMIT_FSIZE: every write past
1 kB fails with EFBIG, no root needed)."""

import contextlib
import errno
import os
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from rskd_jax.train.checkpoint import Checkpointer, CheckpointSaveError, restore_target


def state(s):
    return {"w": jnp.arange(20000.0) * s, "b": jnp.full((5,), float(s))}


@contextlib.contextmanager
def disk_full(monkeypatch):
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    with monkeypatch.context() as m:
        for cls in {type(epath.Path("/tmp")), epath.gpath.PosixGPath}:
            m.setattr(cls, "write_text", no_space)
            m.setattr(cls, "write_bytes", no_space)
        yield


@contextlib.contextmanager
def file_size_limit(monkeypatch):
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the process being killed
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("layer", [disk_full, file_size_limit], ids=["ENOSPC", "EFBIG"])
def test_failed_save_keeps_previous_steps_and_says_what_to_fix(tmp_path, monkeypatch, layer, async_save):
    d = tmp_path / "ckpt"
    ck = Checkpointer(d, max_to_keep=2, async_save=async_save)
    for s in (1, 2):
        ck.save(s, state(s))
    ck.wait()
    with pytest.raises(CheckpointSaveError) as e, layer(monkeypatch):
        ck.save(3, state(3))  # max_to_keep=2: a successful save would delete step 1
        ck.wait()  # an async save fails here (or at the next save)
    msg = str(e.value)
    assert f"saving checkpoint step 3 to {d} failed" in msg, msg
    assert "previous checkpoints are kept (steps [1, 2])" in msg and "resumes from step 2" in msg, msg
    if layer is disk_full:
        assert "No space left on device" in msg and "free disk space" in msg, msg
    with contextlib.suppress(CheckpointSaveError):
        ck.close()
    assert sorted(os.listdir(d)) == ["1", "2"]  # no partial step left, nothing deleted

    ck = Checkpointer(d, max_to_keep=2)
    assert ck.all_steps() == [1, 2]
    target = restore_target(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0)))
    r = ck.restore_latest_valid(target)
    assert r.step == 2
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.asarray(state(2)["w"]))
    ck.close()
