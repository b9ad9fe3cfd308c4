"""The demo's control stage (`student_sft_more/`): the student SFT checkpoint continued with plain SFT for the
distillation's steps. Checked on the `tiny` preset with the training loop replaced by a recorder (no step is
compiled): the control gets no teacher and a pure-SFT loss, and the same step count, lr schedule, trainable
subset, seed and batches as the distillation stage; the report is asked for all four models."""

import numpy as np
import pytest

from configs.distill import get_config
from rskd_jax.train import loop
from rskd_jax.train import run as run_lib


def _first_batch(dataset) -> dict:
    return next(iter(dataset))


@pytest.mark.slow  # ~20 s alone: builds the tiny models and datasets of every stage (no step is compiled)
def test_sft_control_gets_no_teacher_and_the_distillation_schedule(tmp_path, monkeypatch):
    config = get_config("tiny")
    config.data.batch_size = 8  # divisible by the 8 test devices (mesh fsdp = all of them)
    config.export_student = False
    calls = {}

    def fake_fit(job, opts):
        calls[job.name] = dict(vars(job), first=_first_batch(job.dataset))
        return loop.FitResult(job.model, None, job.total_steps, False, [])

    reports = []
    monkeypatch.setattr(loop, "fit", fake_fit)
    monkeypatch.setattr(run_lib, "final_report", lambda ctx, **kw: reports.append(kw))
    run_lib.run(config, tmp_path)

    assert list(calls) == ["teacher", "student_sft", "student_sft_more", "distill"]
    control, distill = calls["student_sft_more"], calls["distill"]
    assert control["teacher"] is None and distill["teacher"] is not None
    assert dict(control["spec"].weights) == {"sft": 1.0} and control["spec"].sampling is None
    for key in ("total_steps", "seed", "trainable"):
        assert control[key] == distill[key], key
    assert control["total_steps"] == config.total_steps
    assert control["optim_cfg"].to_dict() == distill["optim_cfg"].to_dict()
    assert control["first"].keys() == distill["first"].keys()
    for k in control["first"]:  # the same data order
        np.testing.assert_array_equal(control["first"][k], distill["first"][k])
    # it starts from the student SFT model, as a separate copy (distillation trains the other one)
    assert control["model"] is not distill["model"]
    assert control["workdir"] == tmp_path / "student_sft_more"
    (rep,) = reports
    assert rep["control"] is control["model"] and rep["after"] is distill["model"]
