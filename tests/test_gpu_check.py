"""tools/gpu_check.sh --dry-run on CPU: every part of the GPU check runs at small size and the summary is
written, so the script a GPU run needs cannot rot (bench/gpu_check.py; what it measures: docs/gpu.md)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ["env", "tests", "models", "attention", "bench", "demo"]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu_check"
    p = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHON=sys.executable),  # the script's interpreter: this one
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] and s["verdict"] == "PASS"
    by = {r["part"]: r for r in s["parts"]}
    assert list(by) == PARTS and all(r["status"] == "pass" for r in s["parts"])
    assert by["env"]["result"]["backend"] == "cpu" and by["env"]["result"]["versions"]["jax"]
    assert " passed" in by["tests"]["result"]["pytest"]
    models = by["models"]["result"]["rows"]
    assert {r["variant"] for r in models} >= {"fp32 highest", "bf16 compute, bf16 weights"}
    assert all(r["err"] <= r["tol"] and r["top1"] >= r["min_top1"] for r in models)
    att = {r["check"]: r for r in by["attention"]["result"]["rows"]}
    assert att["attention sdpa_xla bfloat16"]["out_err"] <= att["attention sdpa_xla bfloat16"]["tol"]
    assert att["attention cudnn bfloat16"]["refused"].startswith("NotImplementedError")  # CPU: documented
    bench = by["bench"]["result"]
    assert bench["step_ms"] > 0 and bench["rollout_tokens_per_s"] > 0 and bench["mfu_pct"] is None  # no peak
    assert by["demo"]["result"]["report"] and (out / "demo" / "report.md").is_file()
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check (DRY RUN") and "| demo |" in md and "## attention" in md


def test_unknown_part_is_a_usage_error(tmp_path):
    p = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--parts", "env,mfu", "--out", str(tmp_path / "x")],
        cwd=ROOT,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.strip() == (
        "gpu_check: --parts mfu unknown; expected some of env,tests,models,attention,bench,demo"
    )
    assert not (tmp_path / "x").exists()
