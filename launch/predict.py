"""Batched greedy answers for many images into a JSONL file (console script `rskd-predict`).

    python launch/predict.py --model DIR --input FOLDER_OR_JSONL --out answers.jsonl [--question Q]

All logic lives in rskd_jax.serve.predict_cli (importable, tested); see its doc for the options.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def run() -> None:
    from rskd_jax.serve.predict_cli import main  # noqa: PLC0415

    sys.exit(main())


if __name__ == "__main__":
    run()
