"""Shared by the launch/ CLIs."""

import sys

HELP_FLAGS = {"--help", "-h", "-?", "--helpshort", "--helpfull"}


def run_app(main):
    """`absl.app.run(main)`, except that `--help` exits with status 0 (absl's help flags exit with 1)."""
    from absl import app  # noqa: PLC0415

    try:
        app.run(main)
    except SystemExit as e:
        if e.code == 1 and set(sys.argv[1:]) & HELP_FLAGS:
            sys.exit(0)
        raise
