"""Shared by the launch/ CLIs."""

import sys

HELP_FLAGS = {"--help", "-h", "-?", "--helpshort", "--helpfull"}


def run_app(main):
    """`absl.app.run(main)`, except that `--help` exits with status 0 (absl's help flags exit with 1) and a
    refused configuration (`ConfigError`) prints one line and exits with status 2."""
    from absl import app  # noqa: PLC0415

    from rskd_jax.distill.checks import ConfigError  # noqa: PLC0415

    try:
        app.run(main)
    except ConfigError as e:  # a configuration the step refuses: one line, usage-error status
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if e.code == 1 and set(sys.argv[1:]) & HELP_FLAGS:
            sys.exit(0)
        raise
