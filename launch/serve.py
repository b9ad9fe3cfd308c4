"""The web demo: upload or pick an image, chat, see the boxes (console script `rskd-serve`).

    python launch/serve.py --model DIR [--port 7860]       # then open http://127.0.0.1:7860/

All logic lives in rskd_jax.serve.serve_cli and rskd_jax.serve.web (importable, tested).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def run() -> None:
    from rskd_jax.serve.serve_cli import main  # noqa: PLC0415

    sys.exit(main())


if __name__ == "__main__":
    run()
