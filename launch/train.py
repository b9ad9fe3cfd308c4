r"""Train: the embedded demo by default, or any preset of configs/distill.py / configs/sft.py.

    python launch/train.py --config configs/distill.py [--workdir runs/demo] [--config.total_steps=100]

All logic lives in rskd_jax.train.run (importable, tested); this file only parses flags.
"""

import os
import sys

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
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, report). Default: runs/<preset>."
)
_COORD = flags.DEFINE_string(
    "coordinator",
    None,
    "Multi-process without a cluster manager: host:port of process 0 "
    "(with --num_processes and --process_id). TPU pods are detected automatically.",
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
_STAGE = flags.DEFINE_enum(
    "stage",
    "auto",
    ["auto", "teacher", "student_sft", "student_sft_more", "distill", "eval"],
    "Stop after this stage (auto = everything the config asks for, resuming what is done); eval only "
    "evaluates the trained stages and refuses when one is not trained.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rskd_jax.train.run import run as run_training  # noqa: PLC0415  (import after flag parsing: jax start-up)

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.get("preset", "run"))
    run_training(
        config,
        workdir,
        stage=_STAGE.value,
        coordinator=_COORD.value,
        num_processes=_NPROC.value,
        process_id=_PID.value,
    )


def run():  # console script entry point `rskd-train`
    from rskd_jax.cli import run_app  # noqa: PLC0415

    run_app(main)


if __name__ == "__main__":
    run()
