"""Every bench script runs with `--quick` and writes the JSON bench/README.md promises (speed never asserted).

The scripts run as subprocesses, three at a time (compilation is mostly single-threaded), with XLA's CPU
backend optimisation turned down (the numbers are not looked at, only the code paths). Besides the JSON keys,
the checks the scripts compute are asserted: both sides of the step benchmark compute the same losses from the
same weights, the analytic FLOP count agrees with XLA's and torch's counters, and the sampled tokens'
recorded log-probs agree with a cache-free transformers forward.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import shared_data_dir
from xla_flags import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["step", "full_step", "rollout", "gpu", "convert", "input"]
TIMEOUT_S = 600


def _run(name: str, out: pathlib.Path, data: pathlib.Path | None) -> dict:
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, PYTHONWARNINGS="ignore")
    if data is not None:
        env["RSKD_SHARED_DATA"] = str(data)
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return dict(rc=proc.returncode, log=(proc.stdout + proc.stderr)[-4000:], out=out)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected tests' scripts, 3 concurrently; input.py only when the real UC Merced data is available."""
    tmp = tmp_path_factory.mktemp("bench")
    data = shared_data_dir()
    selected = " ".join(item.name for item in request.session.items)
    names = [
        n
        for n in SCRIPTS
        if f"test_{n}" in selected
        and (ROOT / "bench" / f"{n}.py").exists()
        and (n != "input" or data is not None)
    ]
    with ThreadPoolExecutor(3) as pool:
        futures = {n: pool.submit(_run, n, tmp / f"{n}.json", data) for n in names}
        return {n: f.result() for n, f in futures.items()}


def result(runs, name) -> dict:
    if name not in runs:
        pytest.skip(f"bench/{name}.py not run (missing script, or RSKD_SHARED_DATA unset for input.py)")
    r = runs[name]
    assert r["rc"] == 0, f"bench/{name}.py --quick failed:\n{r['log']}"
    assert r["out"].exists(), f"bench/{name}.py wrote no JSON to {r['out']}:\n{r['log']}"
    return json.loads(r["out"].read_text())


def test_step(runs):
    d = result(runs, "step")
    assert d["quick"] and {"machine", "matmul_ceiling_gflops", "torch_threads", "configs"} <= set(d)
    c = d["configs"][0]
    assert c["config"] == "tiny" and c["tokens_per_step"] == 8 * 64
    assert "ours" in c["rows"] and any(k.startswith("torch") for k in c["rows"])
    for row in c["rows"].values():
        assert {"step_ms", "tokens_per_s", "model_gflops", "executed_gflops"} <= set(row)
        assert row["step_ms"] > 0
    assert c["ratio"] > 0 and c["ratio_vs"].startswith("torch")
    # same weights, same batch -> the same loss terms on both sides
    lc = c["loss_check"]
    assert set(lc["ours"]) == {"rkl", "feat_image", "feat_text"}
    assert lc["max_rel_diff"] < 1e-4, lc
    # the analytic FLOPs agree with XLA's count of the unrolled step and torch's FlopCounterMode
    for k, v in c["flops_check"].items():
        assert 0.97 < v < 1.15, (k, v)


def test_full_step(runs):
    """The whole step (rollout included) against the MiniLLM-style peer; with and without teacher prefix reuse
    the same losses from the same state and key."""
    d = result(runs, "full_step")
    c = d["configs"][0]
    assert c["config"] == "tiny" and c["new_tokens"] == 32
    assert {"ours", "ours_no_reuse", "torch_1t"} <= set(c["rows"])
    assert all(r["step_ms"] > 0 for r in c["rows"].values())
    assert c["ratio"] > 0 and c["ratio_vs"].startswith("torch") and c["reuse_speedup"] > 0
    rc = c["reuse_check"]
    assert {"loss/rkl", "loss/feat_image/0", "loss/feat_text/0"} <= set(rc["ours"])
    assert rc["ours"]["rollout/length"] == 32.0
    assert rc["max_rel_diff"] < 1e-5, rc
    assert c["peer_finite"] and set(c["peer_terms"]["torch"]) >= {"rkl", "feat_image", "feat_text"}


def test_rollout(runs):
    d = result(runs, "rollout")
    c = d["configs"][0]
    assert {"ours", "generate_1t", "minillm_1t"} <= set(c["rows"])
    assert all(r["tokens_per_s"] > 0 for r in c["rows"].values())
    assert {"ours_vs_generate", "ours_vs_minillm"} <= set(c["ratios"])
    checks = c["logprob_check_max_abs"]
    assert set(checks) == {"ours_student_lp", "ours_teacher_lp", "minillm_student_lp", "minillm_teacher_lp"}
    assert max(checks.values()) < 1e-4, checks


def test_gpu(runs):
    """bench/gpu.py is for a lent GPU; --quick runs the same code on CPU at tiny size."""
    d = result(runs, "gpu")
    r = d["results"]
    assert {
        "step_ms",
        "tokens_per_s",
        "model_tflops",
        "mfu_pct",
        "pct_of_matmul_ceiling",
        "rollout_tokens_per_s",
    } <= set(r)
    assert r["step_ms"] > 0 and r["rollout_tokens_per_s"] > 0 and d["step_flops"] > 0
    assert math.isfinite(d["loss_total"])


def test_convert(runs):
    d = result(runs, "convert")
    assert {"checkpoint", "import", "export", "roundtrip_identical"} <= set(d)
    assert d["roundtrip_identical"] is True
    for side in ("import", "export"):
        assert {"seconds", "vm_hwm", "peak_rss_anon"} <= set(d[side])


def test_input(runs):
    d = result(runs, "input")
    row = d["rows"][0]
    assert {"size", "grain", "torch", "ratio"} <= set(row)
    assert row["grain"]["images_per_s"] > 0 and row["torch"]["images_per_s"] > 0
