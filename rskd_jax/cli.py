"""Shared by the launch/ CLIs: flag parsing and error reporting.

A mistake in the input (a config key that does not exist, a value of the wrong type, a missing or unreadable
file, a checkpoint of the wrong shape, an empty dataset) ends the run with ONE line on stderr naming the thing
and what was expected, and exit status 2; a failure of the run itself (a checkpoint save that failed, no
readable checkpoint) with one line and status 1. `--verbose` (any launcher) shows the traceback instead.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback

HELP_FLAGS = {"--help", "-h", "-?", "--helpshort", "--helpfull"}
VERBOSE_FLAG = "--verbose"
USAGE_EXIT, FAILURE_EXIT = 2, 1


def _usage_errors() -> tuple[type, ...]:
    """Exceptions that mean "the input is wrong" (exit 2). ValueError covers DataError, ConversionError and
    CheckpointMismatchError; KeyError is what configs/ and the launchers raise for a config value that names
    nothing (a preset, a data.name); OSError subclasses that name a path the user gave."""
    from absl import app  # noqa: PLC0415 (absl only when run as an app)

    return (
        app.UsageError,
        ValueError,
        KeyError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def _failures() -> tuple[type, ...]:
    """Exceptions that mean "the run failed for a reason outside the code" (exit 1, one line)."""
    from rskd_jax.train.checkpoint import CheckpointError  # noqa: PLC0415 (orbax/jax: only once a run has failed)

    return (CheckpointError, OSError)


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def error_line(prog: str, e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    msg = " ".join(msg.split())  # one line
    return f"{prog}: error: {msg} (--verbose shows the traceback)"


def report(prog: str, e: BaseException, verbose: bool) -> int | None:
    """Exit status for a user-facing error `e` after printing it (one line, or the traceback when `verbose`);
    None when `e` is not one (a bug: let it propagate with its traceback)."""
    if isinstance(e, _usage_errors()):
        code = USAGE_EXIT
    elif isinstance(e, _failures()):
        code = FAILURE_EXIT
    else:
        return None
    if verbose:
        traceback.print_exception(e)
    print(error_line(prog, e), file=sys.stderr, flush=True)
    return code


# ------------------------------------------------------------------------------------ config flag errors
def _config_flags(flag_values) -> dict:
    """name -> flag object of the ml_collections config flags."""
    return {n: flag_values[n] for n in list(flag_values) if hasattr(type(flag_values[n]), "config_filename")}


def _config_argument(name: str, flag, argv: list[str]) -> str | None:
    """The `file[:preset]` given to `--name` on the command line (the last one wins), else the default."""
    arg = flag.default if isinstance(flag.default, str) else None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            arg = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            arg = argv[i + 1]
    return arg


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict / dict."""
    keys = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if hasattr(v, "items"):
            keys += config_keys(v, path + ".")
    return keys


def unknown_key(config, dotted: str) -> str | None:
    """The first component of `dotted` missing from `config` (as the dotted prefix up to it), or None."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        name = re.sub(r"\[.*\]$", "", part)
        if not hasattr(node, "keys") or name not in node.keys():
            return ".".join(parts[: i + 1])
        node = node[name]
    return None


def closest_keys(config, dotted: str, n: int = 3) -> list[str]:
    """Valid keys nearest to `dotted`: siblings first, then keys whose name contains or resembles its name."""
    parent, _, leaf = dotted.rpartition(".")

    def rank(k):
        same_parent = k.rpartition(".")[0] == parent
        return (
            not same_parent,
            leaf not in leaf_of(k),
            -difflib.SequenceMatcher(None, leaf, leaf_of(k)).ratio(),
        )

    keys = [
        k
        for k in config_keys(config)
        if (len(leaf) >= 3 and leaf in leaf_of(k))
        or difflib.SequenceMatcher(None, leaf, leaf_of(k)).ratio() >= 0.5
    ]
    return sorted(keys, key=rank)[:n]


def leaf_of(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def diagnose_config_override(flag_values, argv: list[str]) -> str | None:
    """When flag parsing failed: the one-line explanation of the first `--<config>.<key>` override whose key
    is not in the loaded config (naming the key, the config file and preset, and the closest valid keys)."""
    flags_ = _config_flags(flag_values)
    for arg in argv[1:]:
        m = re.match(r"--(\w+)\.([\w.\[\]]+)(=|$)", arg)
        if not m or m.group(1) not in flags_:
            continue
        arg = _config_argument(m.group(1), flags_[m.group(1)], argv)
        try:
            config = flags_[m.group(1)].parser.parse(arg)  # loads the file (the failed parse kept nothing)
        except Exception:  # noqa: BLE001 - the file itself is the problem: reported as it is
            return None
        missing = unknown_key(config, m.group(2))
        if missing is None:
            continue
        near = closest_keys(config, missing)
        hint = f"; closest valid keys: {', '.join(near)}" if near else ""
        return f"unknown config key {missing!r} in --{m.group(1)}.{m.group(2)}: not in {arg}{hint}"
    return None


def _parse_failure(e: BaseException, flags, argv: list[str]) -> str:
    """One line for a flag-parsing failure that is not an unknown config key: absl's own message names the
    flag; for a config file that failed to load, the innermost error prefixed with the file."""
    if isinstance(e, flags.Error):
        return " ".join(str(e).split())
    *_, root = _chain(e)  # e.g. the FileNotFoundError / SyntaxError under "failed to load"
    why = " ".join((str(root).strip() or type(root).__name__).split())
    if isinstance(root, KeyError | AttributeError) and root.args:
        why = f"{type(root).__name__}: {root.args[0]}"
    for name, flag in _config_flags(flags.FLAGS).items():
        arg = _config_argument(name, flag, argv)
        if arg and arg.split(":")[0] not in why:
            why = f"--{name}={arg}: {why}"
    return why


# --------------------------------------------------------------------------------------------- running
def _pop_verbose(argv: list[str]) -> bool:
    verbose = VERBOSE_FLAG in argv
    while VERBOSE_FLAG in argv:
        argv.remove(VERBOSE_FLAG)
    return verbose


class _NoLibraryTracebacks(logging.Filter):
    """Keeps the message line of other libraries' log records but drops their tracebacks (orbax logs every
    failed background write with one; the run's own error line says what happened). --verbose keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("rskd_jax"):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_library_tracebacks() -> None:
    """Installs the filter above on the root handlers, and reports exceptions that background threads leave
    unraised at exit (asyncio's "Event loop is closed" after a failed save) as one line."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _NoLibraryTracebacks) for f in h.filters):
            h.addFilter(_NoLibraryTracebacks())
    sys.unraisablehook = lambda u: print(
        f"(ignored at exit: {type(u.exc_value).__name__}: {u.exc_value})", file=sys.stderr
    )


def prog_name() -> str:
    return os.path.basename(sys.argv[0]) or "rskd"


def run_app(main):
    """`absl.app.run(main)` with the error policy above; `--help` exits with status 0 (absl's help flags exit
    with 1)."""
    from absl import app, flags  # noqa: PLC0415 (absl only when run as an app)

    verbose = _pop_verbose(sys.argv)
    prog = prog_name()

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
            for name in _config_flags(flags.FLAGS):  # a config file that failed to load says so on access
                getattr(flags.FLAGS, name).keys()
            return rest
        except Exception as e:  # noqa: BLE001 - any failure to parse the flags is a usage error
            why = diagnose_config_override(flags.FLAGS, argv)
            if verbose:
                traceback.print_exception(e)
            if why is None:
                why = _parse_failure(e, flags, argv)
            print(f"{prog}: error: {why}", file=sys.stderr, flush=True)
            sys.exit(USAGE_EXIT)

    def guarded(argv):
        if not verbose:
            quiet_library_tracebacks()
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - classified by report()
            code = report(prog, e, verbose)
            if code is None:
                raise
            sys.exit(code)

    try:
        app.run(guarded, flags_parser=parse)
    except SystemExit as e:
        if e.code == 1 and set(sys.argv[1:]) & HELP_FLAGS:
            sys.exit(0)
        raise
