"""launch/tpu_pod.py: each subcommand's --dry-run prints the expected gcloud commands, executes nothing."""

import shlex
import subprocess

import pytest

from launch import tpu_pod

BASE = ["--name", "rskd-pod", "--zone", "us-east5-a", "--project", "my-proj"]


def dry_run(capsys, monkeypatch, *argv):
    def refuse(*a, **k):
        raise AssertionError(f"dry run executed {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert tpu_pod.main([argv[0], "--dry-run", *argv[1:]]) == 0  # after "--" args go to train.py
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def ssh_command(cmd):
    (command,) = [a[len("--command=") :] for a in cmd if a.startswith("--command=")]
    return command


def common(cmd, verb):
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]
    assert "--zone=us-east5-a" in cmd and "--project=my-proj" in cmd


def test_create(capsys, monkeypatch):
    (cmd,) = dry_run(capsys, monkeypatch, "create", *BASE, "--accelerator", "v5p-64", "--spot")
    common(cmd, "create")
    assert cmd[5] == "rskd-pod" and "--accelerator-type=v5p-64" in cmd and "--version=v2-alpha-tpuv5" in cmd
    assert "--spot" in cmd
    (cmd,) = dry_run(
        capsys, monkeypatch, "create", *BASE, "--accelerator", "v5e-256", "--version", "custom-v"
    )
    assert "--accelerator-type=v5litepod-256" in cmd and "--version=custom-v" in cmd and "--spot" not in cmd


def test_setup_from_local_checkout(capsys, monkeypatch):
    tar, scp, ssh = dry_run(capsys, monkeypatch, "setup", *BASE, "--repo", "/src/rskd")
    assert tar[:2] == ["tar", "-czf"] and "--exclude=.git" in tar and tar[-3:] == ["-C", "/src/rskd", "."]
    common(scp, "scp")
    assert "--worker=all" in scp and tar[2] in scp and "rskd-pod:/tmp/rskd-jax.tgz" in scp
    common(ssh, "ssh")
    remote = ssh_command(ssh)
    assert "--worker=all" in ssh and "tar -xzf /tmp/rskd-jax.tgz" in remote
    assert "pip install" in remote and "-e '.[tpu]'" in remote


def test_setup_from_git(capsys, monkeypatch):
    (ssh,) = dry_run(
        capsys,
        monkeypatch,
        "setup",
        *BASE,
        "--repo",
        "https://github.com/org/rskd-jax.git",
        "--branch",
        "main",
    )
    remote = ssh_command(ssh)
    assert "--worker=all" in ssh
    assert "git clone --depth 1 --branch main https://github.com/org/rskd-jax.git rskd-jax" in remote
    assert "-e '.[tpu]'" in remote


def test_run_logs_stop_delete(capsys, monkeypatch):
    (run,) = dry_run(
        capsys,
        monkeypatch,
        "run",
        *BASE,
        "--config",
        "configs/distill.py:geochat13b_to_7b",
        "--workdir",
        "gs://bucket/runs/r1",
        "--env",
        "XLA_FLAGS=--xla_foo",
        "--",
        "--config.steps=7",
    )
    common(run, "ssh")
    remote = ssh_command(run)
    assert "--worker=all" in run
    assert (
        "nohup python3 launch/train.py --config=configs/distill.py:geochat13b_to_7b "
        "--workdir=gs://bucket/runs/r1 --config.steps=7 > $HOME/rskd-train.log 2>&1"
    ) in remote
    assert remote.startswith("cd rskd-jax || exit 1; export XLA_FLAGS=--xla_foo;")
    assert remote.endswith("& echo $! > $HOME/rskd-train.pid")

    (logs,) = dry_run(capsys, monkeypatch, "logs", *BASE, "--follow", "--lines", "20")
    assert "--worker=0" in logs and ssh_command(logs) == "tail -n 20 -f $HOME/rskd-train.log"
    (logs_all,) = dry_run(capsys, monkeypatch, "logs", *BASE, "--worker", "all")
    assert "--worker=all" in logs_all

    (stop,) = dry_run(capsys, monkeypatch, "stop", *BASE)
    assert "--worker=all" in stop and "kill -TERM $(cat $HOME/rskd-train.pid)" in ssh_command(stop)
    (kill,) = dry_run(capsys, monkeypatch, "stop", *BASE, "--force")
    assert "kill -KILL" in ssh_command(kill)

    (delete,) = dry_run(capsys, monkeypatch, "delete", *BASE)
    common(delete, "delete")
    assert delete[5] == "rskd-pod" and "--quiet" in delete


def test_every_action_builds_and_errors_are_clear(capsys):
    spec = tpu_pod.PodSpec(name="n", zone="z", workdir="gs://b/w")
    for action in tpu_pod.ACTIONS:
        cmds = tpu_pod.build_commands(action, spec)
        assert cmds and all(isinstance(c, list) and all(isinstance(a, str) for a in c) for c in cmds)
    assert tpu_pod.main(["run", "--name", "n", "--zone", "z", "--dry-run"]) == 2
    assert "needs --workdir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--version"):
        tpu_pod.build_commands("create", tpu_pod.PodSpec(name="n", zone="z", accelerator="v9x-8"))
    with pytest.raises(SystemExit):
        tpu_pod.main(["reboot", "--name", "n", "--zone", "z"])
