"""`launch/train.py` end to end on the `tiny` preset of the embedded demo (teacher SFT -> student SFT -> distillation
-> evaluation report), and its operations: SIGTERM -> save + exit 0, SIGKILL -> resume from the last checkpoint, a
corrupt newest checkpoint -> fall back to the previous one; the resumed run ends bitwise equal to an uninterrupted run."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train(workdir, *flags, expect_rc=0, stage="distill"):
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs" / "distill.py") + ":tiny",
        "--workdir",
        str(workdir),
        "--stage",
        stage,
        *flags,
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == expect_rc, (out.returncode, out.stderr[-3000:])
    return out.stderr + out.stdout


def final_state(workdir, step=6):
    with ocp.PyTreeCheckpointer() as c:
        return c.restore(str(workdir / "distill" / "checkpoints" / str(step) / "state"))


def logged(workdir):
    return {
        r["step"]: r
        for r in map(json.loads, (workdir / "distill" / "metrics.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of the whole tiny demo (all stages + report)."""
    a = tmp_path_factory.mktemp("run") / "a"
    log = train(a, stage="auto")
    return a, log


def test_demo_report(finished_run):
    a, log = finished_run
    md = (a / "report.md").read_text()
    for heading in (
        "Scene classification",
        "VQA",
        "grounding",
        "Region captioning",
        "Parameters and FLOPs",
        "Divergence to the teacher",
    ):
        assert heading.lower() in md.lower(), heading
    rep = json.loads((a / "report.json").read_text())
    before, after = rep["divergence"]["student (before)"], rep["divergence"]["student (after)"]
    # distillation moved the student towards the teacher on held-out data, on both measures
    assert after["rkl_sampled"] < before["rkl_sampled"]
    assert after["rkl_gt"] < before["rkl_gt"]
    assert (a / "distill_curves.png").stat().st_size > 1000
    assert set(rep["curves"]) >= {"loss/rkl", "loss/pg", "loss/total", "rollout/rev_kl_k3"}


def test_kill_and_resume_is_exact(finished_run, tmp_path):
    a, _ = finished_run
    b = tmp_path / "b"
    # the same run, interrupted: reuse the finished teacher / student stages and tokenizer
    b.mkdir()
    for d in ("tokenizer", "teacher", "student_sft"):
        shutil.copytree(a / d, b / d)
    kill = ["--config.debug.kill_stage=distill"]
    log = train(b, *kill, "--config.debug.kill_at_step=2", "--config.debug.kill_signal=SIGTERM")
    assert "stop requested" in log
    assert sorted(os.listdir(b / "distill" / "checkpoints")) == ["2"]  # saved at the signal's step boundary
    train(b, *kill, "--config.debug.kill_at_step=5", "--config.debug.kill_signal=SIGKILL", expect_rc=-9)
    assert "3" in os.listdir(b / "distill" / "checkpoints")  # the periodic checkpoint (ckpt_every=3)
    # corrupt the newest checkpoint: the run must fall back to step 2 with a warning
    for f in (b / "distill" / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    log = train(b)
    assert "corrupt" in log.lower() and "resumed from step 2" in log
    sa, sb = jax.tree.leaves(final_state(a)), jax.tree.leaves(final_state(b))
    assert len(sa) == len(sb) > 10
    for x, y in zip(sa, sb):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    la, lb = logged(a), logged(b)
    assert la[6] | {"time": 0} == lb[6] | {"time": 0}  # same losses (the window of steps 5-6)
    assert sorted(lb) == [2, 4, 6]  # one entry per logged step after the resumes
