"""Run rskd-jax on a Cloud TPU VM slice with gcloud: create, setup, run, logs, stop, delete.

    python launch/tpu_pod.py create --name rskd --zone us-east5-a --accelerator v5p-64 [--spot]
    python launch/tpu_pod.py setup  --name rskd --zone us-east5-a --repo .            # or a git URL
    python launch/tpu_pod.py run    --name rskd --zone us-east5-a \\
        --config configs/distill.py:geochat13b_to_7b --workdir gs://BUCKET/runs/r1 [-- --config.steps=2000]
    python launch/tpu_pod.py logs   --name rskd --zone us-east5-a [--follow] [--worker all]
    python launch/tpu_pod.py stop   --name rskd --zone us-east5-a          # SIGTERM: save, then exit
    python launch/tpu_pod.py delete --name rskd --zone us-east5-a

`--dry-run` prints every command instead of running it. `build_commands(action, spec)` returns the
commands (argv lists) for tests and other tools. See docs/tpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence

ACTIONS = ("create", "setup", "run", "logs", "stop", "delete")
REMOTE_DIR = "rskd-jax"  # relative to the remote home directory (ssh sessions start there)
LOG_FILE = "rskd-train.log"
PID_FILE = "rskd-train.pid"
# TPU VM software versions per accelerator family (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


@dataclasses.dataclass
class PodSpec:
    name: str
    zone: str
    project: str | None = None
    accelerator: str = "v5p-64"
    version: str | None = None
    repo: str = "."
    branch: str | None = None
    config: str = "configs/distill.py:geochat13b_to_7b"
    workdir: str | None = None
    spot: bool = False
    preemptible: bool = False
    env: tuple[str, ...] = ()
    train_args: tuple[str, ...] = ()
    worker: str = "0"
    lines: int = 100
    follow: bool = False
    force: bool = False

    @property
    def accelerator_type(self) -> str:
        """gcloud spelling: v5e-N is called v5litepod-N."""
        return self.accelerator.replace("v5e-", "v5litepod-")

    @property
    def runtime_version(self) -> str:
        if self.version:
            return self.version
        family = self.accelerator_type.split("-")[0]
        if family not in RUNTIME_VERSIONS:
            raise ValueError(
                f"no default TPU software version for accelerator {self.accelerator!r}; pass "
                f"--version (known families: {sorted(RUNTIME_VERSIONS)})"
            )
        return RUNTIME_VERSIONS[family]


def _is_git_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def _gcloud(spec: PodSpec, *verb: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *verb, spec.name, f"--zone={spec.zone}"]
    return cmd + ([f"--project={spec.project}"] if spec.project else [])


def _ssh(spec: PodSpec, command: str, worker: str = "all") -> list[str]:
    return _gcloud(spec, "ssh") + [f"--worker={worker}", f"--command={command}"]


def _install(spec: PodSpec) -> str:
    return (
        f"cd {REMOTE_DIR} && python3 -m pip install -q -U pip && "
        "python3 -m pip install -q -e '.[tpu]'"  # setup.py's tpu extra: jax[tpu] + libtpu pins
    )


def build_commands(action: str, spec: PodSpec) -> list[list[str]]:
    """The commands (argv lists) that `action` runs, in order."""
    if action == "create":
        cmd = _gcloud(spec, "create") + [
            f"--accelerator-type={spec.accelerator_type}",
            f"--version={spec.runtime_version}",
        ]
        return [cmd + (["--spot"] if spec.spot else []) + (["--preemptible"] if spec.preemptible else [])]
    if action == "setup":
        if _is_git_url(spec.repo):
            branch = f" --branch {shlex.quote(spec.branch)}" if spec.branch else ""
            fetch = (
                f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; else "
                f"git clone --depth 1{branch} {shlex.quote(spec.repo)} {REMOTE_DIR}; fi"
            )
            return [_ssh(spec, f"set -e; {fetch}; {_install(spec)}")]
        tarball = f"/tmp/rskd-jax-{spec.name}.tgz"
        return [
            [
                "tar",
                "-czf",
                tarball,
                "--exclude=.git",
                "--exclude=__pycache__",
                "--exclude=*.egg-info",
                "--exclude=.venv",
                "-C",
                spec.repo,
                ".",
            ],
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                tarball,
                f"{spec.name}:/tmp/rskd-jax.tgz",
                f"--zone={spec.zone}",
                "--worker=all",
            ]
            + ([f"--project={spec.project}"] if spec.project else []),
            _ssh(
                spec,
                f"set -e; mkdir -p {REMOTE_DIR} && tar -xzf /tmp/rskd-jax.tgz -C {REMOTE_DIR}; "
                f"{_install(spec)}",
            ),
        ]
    if action == "run":
        if not spec.workdir:
            raise ValueError("run needs --workdir (a gs:// path every worker can reach)")
        exports = "".join(f"export {shlex.quote(kv)}; " for kv in spec.env)
        train = shlex.join(
            [
                "python3",
                "launch/train.py",
                f"--config={spec.config}",
                f"--workdir={spec.workdir}",
                *spec.train_args,
            ]
        )
        # `cd` first (not `cd && ... &`, which would background a subshell) so $! is python's pid.
        return [
            _ssh(
                spec,
                f"cd {REMOTE_DIR} || exit 1; {exports}nohup {train} > $HOME/{LOG_FILE} 2>&1 "
                f"< /dev/null & echo $! > $HOME/{PID_FILE}",
            )
        ]
    if action == "logs":
        follow = " -f" if spec.follow else ""
        return [_ssh(spec, f"tail -n {int(spec.lines)}{follow} $HOME/{LOG_FILE}", worker=spec.worker)]
    if action == "stop":
        sig = (
            "KILL" if spec.force else "TERM"
        )  # TERM: the trainer saves at the next step boundary and exits 0
        return [
            _ssh(spec, f"if [ -f $HOME/{PID_FILE} ]; then kill -{sig} $(cat $HOME/{PID_FILE}) || true; fi")
        ]
    if action == "delete":
        return [_gcloud(spec, "delete") + ["--quiet"]]
    raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")


def parse_args(argv: Sequence[str]) -> tuple[str, PodSpec, bool]:
    argv = list(argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator", default="v5p-64", help="e.g. v5p-64 (v5p-N counts TensorCores), v4-32")
    p.add_argument("--version", default=None, help="TPU software version (default: by accelerator family)")
    p.add_argument("--repo", default=".", help="local checkout (copied with scp) or a git URL (cloned)")
    p.add_argument("--branch", default=None, help="git branch for a git --repo")
    p.add_argument("--config", default=PodSpec.config)
    p.add_argument("--workdir", default=None, help="gs://... run directory (checkpoints, metrics)")
    p.add_argument("--spot", action="store_true", help="create a Spot VM (cheaper, can be preempted)")
    p.add_argument("--preemptible", action="store_true", help="create a preemptible VM (legacy Spot)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported for run (repeatable)")
    p.add_argument("--worker", default="0", help="logs: worker index or 'all'")
    p.add_argument("--lines", type=int, default=100, help="logs: lines to show")
    p.add_argument("--follow", action="store_true", help="logs: keep following")
    p.add_argument("--force", action="store_true", help="stop: SIGKILL instead of SIGTERM (no final save)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    a = p.parse_args(argv)
    spec = PodSpec(
        name=a.name,
        zone=a.zone,
        project=a.project,
        accelerator=a.accelerator,
        version=a.version,
        repo=a.repo,
        branch=a.branch,
        config=a.config,
        workdir=a.workdir,
        spot=a.spot,
        preemptible=a.preemptible,
        env=tuple(a.env),
        train_args=tuple(train_args),
        worker=a.worker,
        lines=a.lines,
        follow=a.follow,
        force=a.force,
    )
    return a.action, spec, a.dry_run


def main(argv: Sequence[str] | None = None) -> int:
    action, spec, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        commands = build_commands(action, spec)
    except ValueError as e:
        print(f"tpu_pod {action}: {e}", file=sys.stderr)
        return 2
    if action == "run" and not spec.workdir.startswith("gs://"):
        print(
            f"warning: --workdir {spec.workdir} is not on GCS; every worker must see the same directory",
            file=sys.stderr,
        )
    for cmd in commands:
        print(("" if dry_run else "+ ") + shlex.join(cmd), flush=True)
        if not dry_run:
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"tpu_pod {action}: command failed with exit code {rc}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
