r"""Plan: will one training step of a config fit a TPU slice (or 8 H100s)? Compiled ahead of time, no TPU.

    pip install -e ".[plan]"     # libtpu (compiles for TPU topologies on a CPU machine)
    python launch/plan.py --config configs/distill.py:geochat13b_to_7b --topology v5p-64 [--json plan.json]

Exit code 0: fits (total per-device bytes <= HBM minus the margin); 3: does not fit. All logic lives in
rskd_jax.train.plan; this file parses flags and sets the environment before jax starts (JAX_PLATFORMS=cpu,
TPU_SKIP_MDS_QUERY=1 for libtpu; --xla_force_host_platform_device_count=N for the fake-CPU fallback).
"""

import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_ROOT, "configs", "distill.py"),
    "Config file[:preset,key=value,...].",
    lock_config=True,
)
_TOPO = flags.DEFINE_string(
    "topology",
    "v5p-64",
    "Target: v5p-8..128, v4-8..128, v5e-16..256 (v4/v5p names "
    "count TensorCores: v5p-64 = 32 chips), 8xH100, 8xA100-40GB or 1xH100 (fake CPU devices).",
)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: config data.batch_size).")
_REMAT = flags.DEFINE_string("remat", None, "Student remat policy (none, full, dots_saveable, ...).")
_DTYPE = flags.DEFINE_string("compute_dtype", None, "Compute dtype of both models (e.g. bfloat16).")
_TDTYPE = flags.DEFINE_string("teacher_param_dtype", None, "Frozen teacher's parameter dtype.")
_SDTYPE = flags.DEFINE_string("student_param_dtype", None, "Student's parameter (master weight) dtype.")
_HBM = flags.DEFINE_float("hbm_gib", None, "Override the chip's HBM per device (GiB).")
_MARGIN = flags.DEFINE_float("margin", 0.10, "Fraction of HBM kept free.")
_DUMP = flags.DEFINE_string("dump_hlo", None, "Directory for the compiled HLO text.")
_BACKEND = flags.DEFINE_enum(
    "backend",
    "auto",
    ["auto", "tpu", "cpu"],
    "tpu: libtpu deviceless compile; cpu: fake CPU devices (pessimistic); "
    "auto: tpu for TPU targets when libtpu is installed.",
)
_JSON = flags.DEFINE_string("json", None, "Write the report as JSON here.")


def _set_device_env(n_devices: int, use_libtpu: bool) -> bool:
    """Environment for jax; returns True when it changed something jax (already imported) has read."""
    env = dict(JAX_PLATFORMS="cpu")
    if use_libtpu:
        # No TPU is used: several deviceless compiles (or other jax processes) may load libtpu at once.
        logs = os.environ.get("TPU_LOG_DIR") or os.path.join(tempfile.gettempdir(), "rskd_plan_tpu_logs")
        env.update(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_LOG_DIR=logs)
    else:
        kept = [
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n_devices}"])
    changed = any(os.environ.get(k) != v for k, v in env.items())
    os.environ.update(env)
    return changed


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rskd_jax.train import plan as P  # noqa: PLC0415  (no jax import at module level)

    try:
        topo = P.get_topology(_TOPO.value)
    except KeyError as e:
        raise app.UsageError(e.args[0]) from None
    changed = _set_device_env(topo.devices, P.backend_for(topo, _BACKEND.value) == "tpu")
    if changed and "jax" in sys.modules:  # too late for this process: start again with the environment set
        os.execv(sys.executable, [sys.executable, *sys.argv])
    result = P.plan(
        _CONFIG.value,
        topo,
        batch_size=_BATCH.value,
        remat=_REMAT.value,
        compute_dtype=_DTYPE.value,
        teacher_param_dtype=_TDTYPE.value,
        student_param_dtype=_SDTYPE.value,
        hbm_bytes=None if _HBM.value is None else int(_HBM.value * P.GIB),
        margin=_MARGIN.value,
        dump_hlo=_DUMP.value,
        backend=_BACKEND.value,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(P.format_table(result), flush=True)
    if _JSON.value:
        P.write_json(result, _JSON.value)
    return 0 if result.fits else 3


def run():  # console script entry point `rskd-plan`
    from rskd_jax.cli import run_app  # noqa: PLC0415

    run_app(main)


if __name__ == "__main__":
    run()
