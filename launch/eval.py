r"""Evaluate a model on the paper's tasks (or print the parameter / FLOPs table).

    python launch/eval.py --config configs/eval.py:scene --config.checkpoint=/ckpt/geochat7b \
        --config.data_dir=/data/UCMerced_LandUse/Images [--config.limit=210] [--config.out_dir=runs/eval/ucm]
    python launch/eval.py --config configs/eval.py:params

Writes metrics.json, metrics.md (the paper's table layout), predictions/*.jsonl and the PNGs into out_dir.
All logic lives in rskd_jax.eval.runner.run_eval (importable, tested); this file only parses flags.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_ROOT, "configs", "eval.py"),
    "Config file[:preset,key=value,...].",
    lock_config=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from rskd_jax.eval.runner import run_eval  # noqa: PLC0415  (import after flag parsing: jax start-up)

    run_eval(_CONFIG.value)


def run():
    """Console script `rskd-eval`."""
    from rskd_jax.cli import run_app  # noqa: PLC0415

    run_app(main)


if __name__ == "__main__":
    run()
