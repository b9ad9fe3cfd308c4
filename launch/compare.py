r"""A controlled comparison of distillation methods (same start, steps, data order and evaluation).

    python launch/compare.py --config configs/compare.py [--workdir runs/compare] [--config.compare.start=runs/demo]

Writes compare.md / compare.json / compare.png into the workdir; a rerun skips the finished method x seed runs.
All logic lives in rskd_jax.train.compare (importable, tested); this file only parses flags.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_ROOT, "configs", "compare.py"),
    "Config file[:preset,key=value,...].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory. Default: runs/<preset> (runs/compare).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from rskd_jax.train.compare import compare  # noqa: PLC0415  (import after flag parsing: jax start-up)

    config = _CONFIG.value
    compare(config, _WORKDIR.value or os.path.join("runs", config.get("preset", "compare")))


if __name__ == "__main__":
    from rskd_jax.cli import run_app  # noqa: PLC0415

    run_app(main)
