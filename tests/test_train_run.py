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
from xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


# Starts the command with SIGXFSZ ignored and no file allowed past argv[1] bytes (both survive exec), so
# writes past it fail with EFBIG; no preexec_fn (forking this multithreaded process is unsafe).
LIMIT_FILE_SIZE = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def train(workdir, *flags, expect_rc=0, stage="distill", max_file_bytes=None):
    limit = [] if max_file_bytes is None else ["-c", LIMIT_FILE_SIZE, str(max_file_bytes)]
    cmd = [
        sys.executable,
        *limit,
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(ROOT / "configs" / "distill.py") + ":tiny",
        "--workdir",
        str(workdir),
        "--stage",
        stage,
        *flags,
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
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


def _answers(path) -> dict:
    """{id: answer, whitespace collapsed, lower case} of a predictions JSONL."""
    rows = (json.loads(x) for x in path.read_text().splitlines() if x.strip())
    return {r["id"]: " ".join(r["prediction"].split()).lower() for r in rows}


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
        "Agreement with the teacher",
    ):
        assert heading.lower() in md.lower(), heading
    rep = json.loads((a / "report.json").read_text())
    names = ["teacher", "student SFT", "student SFT continued", "student distilled"]
    assert list(rep["results"]) == names and list(rep["divergence"]) == names[1:]
    assert all(f"| {n} |" in md for n in names) and "Δ (student distilled − student SFT continued)" in md
    before, after = rep["divergence"]["student SFT"], rep["divergence"]["student distilled"]
    # distillation moved the student towards the teacher on held-out data, on both measures
    assert after["rkl_sampled"] < before["rkl_sampled"]
    assert after["rkl_gt"] < before["rkl_gt"]
    # agreement with the teacher's answers, per predictions file: recounted here from the files
    assert list(rep["agreement"]) == names[1:]
    for name, row in rep["agreement"].items():
        assert row, name
        for stem, value in row.items():
            t, s = (
                _answers(a / "eval" / who / "predictions" / f"{stem}.jsonl")
                for who in ("teacher", name.replace(" ", "_"))
            )
            assert value == pytest.approx(100 * sum(t[k] == s[k] for k in t) / len(t)), (name, stem)
    assert (a / "distill_curves.png").stat().st_size > 1000
    assert set(rep["curves"]) >= {"loss/rkl", "loss/pg", "loss/total", "rollout/rev_kl_k3"}
    # the control: plain SFT only (no teacher term, no rollout), as many steps as the distillation
    control = [json.loads(x) for x in (a / "student_sft_more" / "metrics.jsonl").read_text().splitlines()]
    assert control[-1]["step"] == max(logged(a)) == 6
    assert {k for r in control for k in r if k.startswith(("loss/", "rollout/"))} == {
        "loss/sft",
        "loss/total",
    }


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


def copy_run(a, dst):
    """The finished run's stages, distillation included, copied to `dst`."""
    for sub in ("tokenizer", "teacher", "student_sft", "distill"):
        shutil.copytree(a / sub, dst / sub)
    return dst


def test_finished_stage_with_damaged_final_step_restarts_with_more_steps(finished_run, tmp_path):
    """The issue's case: a finished distillation stage whose final step's array data files are overwritten
    (what a disk error or a cut-short write leaves), restarted with more steps: the damaged step is set aside
    with a warning and the run goes on from the previous step to the new end."""
    c = copy_run(finished_run[0], tmp_path / "c")
    ckpts = c / "distill" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["3", "6"]
    data_files = list((ckpts / "6" / "state" / "ocdbt.process_0" / "d").iterdir())
    assert data_files
    for f in data_files:
        f.write_bytes(b"\0" * f.stat().st_size)
    log = train(c, "--config.total_steps=8")
    assert "checkpoint step 6 cannot be used" in log and "resumed from step 3" in log, log[-3000:]
    assert "moved it to" in log and (ckpts / "6.corrupt").is_dir()
    assert "8" in os.listdir(ckpts) and "6" in os.listdir(ckpts)  # steps 4..8 trained again and saved
    assert max(logged(c)) == 8


def test_failed_save_stops_the_run_with_one_line_and_keeps_checkpoints(finished_run, tmp_path):
    """Writes fail at the kernel (RLIMIT_FSIZE: no file may grow past 64 kB, so the checkpoint's array data
    cannot be written): exit status 1, one line saying what to fix, step 3 intact, no step 6 left behind."""
    d = copy_run(finished_run[0], tmp_path / "d")
    ckpts = d / "distill" / "checkpoints"
    shutil.rmtree(ckpts / "6")
    before = {p.relative_to(ckpts): p.read_bytes() for p in (ckpts / "3").rglob("*") if p.is_file()}
    assert max(map(len, before.values())) > 64 * 1024  # the limit really stops a checkpoint write
    log = train(d, expect_rc=1, max_file_bytes=64 * 1024)
    errors = [ln for ln in log.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "saving checkpoint step 6" in errors[0] and "steps [3]" in errors[0] and "free" in errors[0]
    assert sorted(os.listdir(ckpts)) == ["3"]  # nothing that looks like a finished (or partial) step
    after = {p.relative_to(ckpts): p.read_bytes() for p in (ckpts / "3").rglob("*") if p.is_file()}
    assert after == before


def scores(tree):
    """`tree` without what depends on the clock or the workdir (`*_seconds`, figure paths)."""
    if isinstance(tree, dict):
        return {k: scores(v) for k, v in tree.items() if not k.endswith("_seconds") and k != "figure"}
    return tree


def test_stage_eval_evaluates_without_training(finished_run, tmp_path):
    """`--stage eval` on a finished run writes the report from each stage's final checkpoint and trains
    nothing (no metrics logged, no checkpoint written, no export); with the distillation's final step gone it
    refuses with one line naming the stage, the workdir and the command that trains it."""
    a = finished_run[0]
    e = copy_run(a, tmp_path / "e")
    shutil.copytree(a / "student_sft_more", e / "student_sft_more")
    stages = ("teacher", "student_sft", "student_sft_more", "distill")
    logs = {s: (e / s / "metrics.jsonl").read_text() for s in stages}
    ckpts = {s: sorted(os.listdir(e / s / "checkpoints")) for s in stages}
    train(e, stage="eval")
    rep, ref = (json.loads((d / "report.json").read_text()) for d in (e, a))
    assert (
        list(rep["results"])
        == list(ref["results"])
        == [
            "teacher",
            "student SFT",
            "student SFT continued",
            "student distilled",
        ]
    )
    # the same models as the run that trained them give the same scores
    assert scores(rep["results"]) == scores(ref["results"])
    assert {s: (e / s / "metrics.jsonl").read_text() for s in stages} == logs
    assert {s: sorted(os.listdir(e / s / "checkpoints")) for s in stages} == ckpts
    assert not (e / "student_hf").exists()
    shutil.rmtree(e / "distill" / "checkpoints" / "6")
    log = train(e, stage="eval", expect_rc=2)
    errors = [ln for ln in log.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert f"stage 'distill' of {e} is not trained" in errors[0] and "reaches step 3 of 6" in errors[0]
    assert f"--workdir {e} --stage distill" in errors[0]
    assert sorted(os.listdir(e / "distill" / "checkpoints")) == ["3"]
