"""One script that measures a GPU (<= 10 min on one H100): numerics, kernels, speed, the demo end to end.

    python -m bench.gpu_check [--out runs/gpu_check] [--parts env,tests,models,attention,bench,demo]
    python -m bench.gpu_check --dry-run --out /tmp/gpu_check    # CPU, small shapes: what the tests run
    tools/gpu_check.sh ...                                       # the same, as a shell command

Parts, each a child process with its own time limit (so one hang or crash cannot take the others down, and
each gets the GPU's memory to itself), in this order:

* `env`: jax / jaxlib / plugin versions, devices, `nvidia-smi`.
* `tests`: the model parity tests (tests/test_models_{llama,clip,llava,lora}.py: ours vs transformers, fp32)
  with JAX on the GPU at HIGHEST matmul precision; the TPU-only splash test is deselected.
* `models`: `bench.gpu_parity models`: logits vs transformers in fp32 (HIGHEST and default precision) and bf16
  (fp32 / bf16 weights, XLA and cuDNN attention) with the tolerances of `bench.gpu_parity.TOLERANCES`.
* `attention`: `bench.gpu_parity attention`: cuDNN vs XLA attention vs a written-out softmax, fp32 / bf16, with
  padding, forward and gradients, plus their forward + backward times.
* `bench`: bench/gpu.py: MFU of the distillation step at ~1B student / ~2B teacher in bf16, rollout tokens/s.
* `demo`: the README's demo (`launch/train.py --config configs/distill.py`) in a fresh workdir: wall time and
  the report's numbers.

Writes `summary.json` and `summary.md` (and each part's log and JSON) under `--out`; exit code 0 when every
part passed. `--dry-run` runs every part at small size (`--quick` bench, the `tiny` demo, one parity test),
which is what tests/test_gpu_check.py does on CPU. The script never imports jax itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_TESTS = [
    "tests/test_models_llama.py",
    "tests/test_models_clip.py",
    "tests/test_models_llava.py",
    "tests/test_models_lora.py",
]
ENV_SNIPPET = (
    "import json, importlib.metadata as m, jax\n"
    "v = {}\n"
    "for p in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'flax', 'nvidia-cudnn-cu12'):\n"
    "    try: v[p] = m.version(p)\n"
    "    except m.PackageNotFoundError: v[p] = None\n"
    "d = jax.devices()\n"
    "print(json.dumps(dict(versions=v, backend=jax.default_backend(), device_count=len(d),\n"
    "                      device_kind=d[0].device_kind)))\n"
)


@dataclasses.dataclass
class Part:
    name: str
    what: str
    argv: list[str]
    timeout_s: int
    env: dict = dataclasses.field(default_factory=dict)
    result_json: str | None = None  # file (under --out) the part writes


def parts(out: pathlib.Path, dry_run: bool) -> list[Part]:
    py = sys.executable
    q = dry_run
    tests = (
        [f"{MODEL_TESTS[0]}::test_llama_matches_hf"] if q else [*MODEL_TESTS, "-k", "not splash"]
    )  # splash = the TPU Pallas kernel
    demo_cfg = "configs/distill.py:tiny" if q else "configs/distill.py"
    return [
        Part("env", "versions and devices", [py, "-c", ENV_SNIPPET], 120),
        Part(
            "tests",
            "model parity tests vs transformers, fp32 (HIGHEST precision)",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *tests,
                "--junitxml",
                str(out / "tests.xml"),
            ],
            150,
            env=dict(JAX_DEFAULT_MATMUL_PRECISION="highest"),
        ),
        Part(
            "models",
            "logits vs transformers: fp32, bf16, cuDNN attention",
            [py, "-m", "bench.gpu_parity", "models", "--out", str(out / "models.json"), *["--dry-run"] * q],
            120,
            result_json="models.json",
        ),
        Part(
            "attention",
            "cuDNN vs XLA vs written-out attention, fp32/bf16, padding, gradients",
            [
                py,
                "-m",
                "bench.gpu_parity",
                "attention",
                "--out",
                str(out / "attention.json"),
                *["--dry-run"] * q,
            ],
            90,
            result_json="attention.json",
        ),
        Part(
            "bench",
            "bench/gpu.py: step MFU (~1B/~2B, bf16) and rollout tokens/s",
            [py, "bench/gpu.py", "--out", str(out / "gpu.json"), *(["--quick"] if q else ["--reps", "5"])],
            200,
            result_json="gpu.json",
        ),
        Part(
            "demo",
            f"the demo end to end ({demo_cfg})",
            [py, "launch/train.py", "--config", demo_cfg, "--workdir", str(out / "demo")],
            300,
            result_json="demo/report.json",
        ),
    ]


def run_part(p: Part, out: pathlib.Path, budget_left: float, dry_run: bool = False) -> dict:
    log = out / f"{p.name}.log"
    limit = min(p.timeout_s, budget_left)
    rec = dict(part=p.name, what=p.what, command=" ".join(p.argv[1:] if p.name != "env" else ["env"]))
    if limit < 10:
        return dict(rec, status="skipped", reason="time budget used up", wall_s=0.0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **p.env)
    if dry_run:  # only the code paths matter: XLA:CPU compiles faster at a low optimisation level
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                p.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit
            )
        status = "pass" if proc.returncode == 0 else "fail"
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        status, rc = "timeout", None
    rec.update(status=status, rc=rc, wall_s=round(time.perf_counter() - t0, 1), limit_s=limit, log=log.name)
    text = log.read_text(errors="replace")
    if status != "pass":
        rec["log_tail"] = text[-1500:]
    rec["result"] = summarise(p, out, text)
    return rec


def summarise(p: Part, out: pathlib.Path, log_text: str) -> dict:
    """The numbers of one part, from its JSON (or its log)."""
    path = out / p.result_json if p.result_json else None
    data = json.loads(path.read_text()) if path and path.is_file() else None
    if p.name == "env":
        lines = [ln for ln in log_text.splitlines() if ln.startswith("{")]
        env = json.loads(lines[-1]) if lines else {}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "--query-gpu=name,driver_version,memory.total"
            r = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = r.stdout.strip()
        return env
    if p.name == "tests":
        last = [ln for ln in log_text.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        return dict(pytest=last[-1].strip("= ") if last else None)
    if data is None:
        return {}
    if p.name in ("models", "attention"):
        return dict(
            checks=len(data["rows"]),
            failed=data["failed"],
            rows=data["rows"],
        )
    if p.name == "bench":
        return dict(data["results"], attention_fallback=data.get("attention_fallback"))
    if p.name == "demo":
        return dict(report=data)
    return {}


def markdown(summary: dict) -> str:
    env = next((r.get("result", {}) for r in summary["parts"] if r["part"] == "env"), {})
    lines = [
        f"# GPU check ({'DRY RUN, ' if summary['dry_run'] else ''}{summary['date']})",
        "",
        f"device: {env.get('device_kind')} x {env.get('device_count')} ({env.get('backend')}); "
        f"nvidia-smi: {env.get('nvidia_smi', 'n/a')}; versions: {env.get('versions')}",
        f"total wall time: {summary['wall_s']:.0f} s; verdict: **{summary['verdict']}**",
        "",
        "| part | what | status | wall s |",
        "|---|---|---|---:|",
    ]
    lines += [f"| {r['part']} | {r['what']} | {r['status']} | {r['wall_s']:.0f} |" for r in summary["parts"]]
    by = {r["part"]: r for r in summary["parts"]}
    if by.get("tests", {}).get("result"):
        lines += ["", f"model parity tests: {by['tests']['result'].get('pytest')}"]
    for name in ("models", "attention"):
        rows = by.get(name, {}).get("result", {}).get("rows", [])
        if rows:
            lines += [
                "",
                f"## {name}",
                "",
                "| check | status | error | tolerance | top-1 / grad error | fwd+bwd ms |",
            ]
            lines += ["|---|---|---:|---:|---:|---:|"]
            for r in rows:
                err = r.get("err", r.get("out_err"))
                extra = r.get("top1", r.get("grad_err"))
                f = lambda x: "" if x is None else f"{x:.3g}"
                note = r.get("refused", "")
                lines.append(
                    f"| {r['check']} | {r['status']} | {f(err) or note} | {f(r.get('tol'))} | {f(extra)} | "
                    f"{f(r.get('fwd_bwd_ms'))} |"
                )
    b = by.get("bench", {}).get("result")
    if b:
        lines += ["", "## step and rollout (bench/gpu.py)", ""]
        lines += [f"* {k}: {v:.4g}" if isinstance(v, float) else f"* {k}: {v}" for k, v in b.items()]
    d = by.get("demo")
    if d:
        lines += ["", f"## demo: {d['status']} in {d['wall_s']:.0f} s ({d['command']})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check", help="output directory (replaced)")
    ap.add_argument("--dry-run", action="store_true", help="small shapes, CPU allowed (the test's mode)")
    ap.add_argument(
        "--parts", default="", help="comma-separated subset of: env,tests,models,attention,bench,demo"
    )
    ap.add_argument("--budget_s", type=float, default=570, help="stop starting parts after this many seconds")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out).resolve()
    all_parts = parts(out, a.dry_run)
    names = [p.name for p in all_parts]
    chosen = [s for s in a.parts.split(",") if s] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(
            f"gpu_check: --parts {','.join(unknown)} unknown; expected some of {','.join(names)}",
            file=sys.stderr,
        )
        return 2
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    records = []
    for p in (p for p in all_parts if p.name in chosen):
        print(f"[gpu_check {time.perf_counter() - t0:5.0f} s] {p.name}: {p.what} ...", flush=True)
        rec = run_part(p, out, a.budget_s - (time.perf_counter() - t0), a.dry_run)
        print(f"[gpu_check {time.perf_counter() - t0:5.0f} s] {p.name}: {rec['status']}", flush=True)
        records.append(rec)
    verdict = "PASS" if all(r["status"] == "pass" for r in records) else "FAIL"
    summary = dict(
        dry_run=a.dry_run,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
        wall_s=time.perf_counter() - t0,
        verdict=verdict,
        parts=records,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
