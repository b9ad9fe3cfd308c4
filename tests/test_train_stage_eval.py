"""`--stage eval` only evaluates: which stages it needs trained, and its refusal when one is not (no model
is loaded, nothing is written). The end-to-end evaluation of a finished run is in test_train_run.py."""

import pathlib

import jax.numpy as jnp
import pytest

from configs import distill as distill_config
from configs import sft as sft_config
from rskd_jax.train import run as run_lib
from rskd_jax.train.checkpoint import Checkpointer, committed_steps


def fake_steps(workdir: pathlib.Path, stage: str, *steps: int, marker: bool = True) -> None:
    """Step directories as a finished save leaves them (the commit marker written last), or without it."""
    for s in steps:
        d = workdir / stage / "checkpoints" / str(s)
        d.mkdir(parents=True)
        if marker:
            (d / "commit_success.txt").write_text("")


def test_committed_steps_reads_what_the_checkpointer_wrote(tmp_path):
    assert committed_steps(tmp_path / "missing") == [] and not (tmp_path / "missing").exists()
    with Checkpointer(tmp_path / "ck", max_to_keep=None, async_save=False) as ck:
        for s in (2, 10):
            ck.save(s, {"w": jnp.zeros(2)})
    (tmp_path / "ck" / "7.corrupt").mkdir()  # a set-aside step
    (tmp_path / "ck" / "12").mkdir()  # a partial step: no commit marker
    assert committed_steps(tmp_path / "ck") == [2, 10]


def test_stage_steps_follow_the_config():
    c = distill_config.get_config("tiny")
    assert run_lib.stage_steps(c) == {"teacher": 4, "student_sft": 2, "student_sft_more": 6, "distill": 6}
    c.sft_control, c.teacher.sft_steps, c.student.sft_steps = False, 0, 0  # converted checkpoints
    assert run_lib.stage_steps(c) == {"distill": 6}
    s = sft_config.get_config("student,steps=5")
    assert run_lib.stage_steps(s) == {"sft": 5}


def test_check_trained_passes_a_finished_workdir(tmp_path):
    c = distill_config.get_config("tiny")
    fake_steps(tmp_path, "teacher", 4)
    fake_steps(tmp_path, "student_sft", 2)
    fake_steps(tmp_path, "student_sft_more", 3, 6)
    fake_steps(tmp_path, "distill", 3, 6)
    run_lib.check_trained(c, tmp_path)  # no error


@pytest.mark.parametrize(
    "missing,reaches",
    [("teacher", 0), ("student_sft_more", 3), ("distill", 3)],
)
def test_check_trained_names_the_first_untrained_stage_and_its_command(tmp_path, missing, reaches):
    c = distill_config.get_config("tiny")
    done = {"teacher": (4,), "student_sft": (2,), "student_sft_more": (3, 6), "distill": (3, 6)}
    for stage, steps in done.items():
        if stage == missing:
            steps = steps[:-1]
        fake_steps(tmp_path, stage, *steps)
    total = done[missing][-1]
    with pytest.raises(ValueError) as e:
        run_lib.check_trained(c, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"stage {missing!r} of {tmp_path} is not trained" in msg
    assert f"reaches step {reaches} of {total}" in msg
    assert (
        f"python launch/train.py --config configs/distill.py:tiny --workdir {tmp_path} --stage {missing}"
        in msg
    )


def test_an_uncommitted_final_step_is_not_trained(tmp_path):
    c = distill_config.get_config("tiny")
    c.sft_control, c.teacher.sft_steps, c.student.sft_steps = False, 0, 0
    fake_steps(tmp_path, "distill", 3)
    fake_steps(tmp_path, "distill", 6, marker=False)  # cut short before its commit marker
    with pytest.raises(ValueError, match=r"stage 'distill' .* reaches step 3 of 6"):
        run_lib.check_trained(c, tmp_path)


def test_run_stage_eval_refuses_before_building_anything(tmp_path):
    """An empty workdir: the refusal comes before the tokenizer is trained or a model is built."""
    c = distill_config.get_config("tiny")
    with pytest.raises(ValueError, match=r"^--stage eval only evaluates, and stage 'teacher' of "):
        run_lib.run(c, tmp_path / "w", stage="eval")
    assert not (tmp_path / "w").exists()


def test_sft_config_names_its_own_command(tmp_path):
    s = sft_config.get_config("student,steps=5")
    with pytest.raises(ValueError, match=r"stage 'sft' .* reaches step 0 of 5.*configs/sft\.py"):
        run_lib.check_trained(s, tmp_path)
