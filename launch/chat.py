"""Ask a model about an image, once or as an interactive chat (console script `rskd-chat`).

    python launch/chat.py --model DIR --image FILE "What is in this image?"
    python launch/chat.py --model DIR --image FILE --task grounding          # interactive

All logic lives in rskd_jax.serve.chat_cli (importable, tested); see its doc for the options.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def run() -> None:
    from rskd_jax.serve.chat_cli import main  # noqa: PLC0415

    sys.exit(main())


if __name__ == "__main__":
    run()
