"""Multi-host training, simulated with two local CPU processes (jax.distributed over gloo): the same losses and
parameters as one process with the same global batch and device count."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from multiproc_testlib import run_processes
from xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def cmd(workdir, *extra):
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs" / "distill.py") + ":tiny",
        "--stage",
        "teacher",
        "--workdir",
        str(workdir),
        *extra,
    ]


def env(devices):
    return dict(os.environ, XLA_FLAGS=xla_flags(devices))


def load_numpy(path):
    """A checkpoint's arrays as numpy (saved on other devices than this process has)."""
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(str(path))
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        return c.restore(
            str(path), restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        )


def test_two_processes_equal_one(tmp_path):
    runs = run_processes(lambda dist: cmd(tmp_path / "two", *dist), 2, timeout=600, env=env(2), cwd=ROOT)
    outs = [t for _, t in runs]
    assert [rc for rc, _ in runs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "process 1 of 2" in outs[1] or "process 1 of 2" in outs[0] or "jax.distributed" in "".join(outs)
    one = subprocess.run(
        cmd(tmp_path / "one"), env=env(4), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-2000:]
    logs = [
        [json.loads(x) for x in (tmp_path / d / "teacher" / "metrics.jsonl").read_text().splitlines()]
        for d in ("two", "one")
    ]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [2, 4]
    for a, b in zip(*logs):
        assert abs(a["loss/sft"] - b["loss/sft"]) <= 1e-5 * abs(b["loss/sft"])
    pa, pb = (load_numpy(tmp_path / d / "teacher" / "checkpoints" / "4" / "state") for d in ("two", "one"))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
