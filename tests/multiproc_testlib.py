"""Launching local multi-process jax.distributed runs from tests (gloo over 127.0.0.1)."""

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_args(port: int, n: int, i: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(n), "--process_id", str(i)]


def run_processes(make_cmd, n: int, *, timeout: float, merge_output: bool = True, **popen) -> list:
    """Runs `make_cmd(distributed_args(...))` as processes 0..n-1 at once; returns (returncode, output) each
    (stdout + stderr when `merge_output`, else stderr only)."""
    port = free_port()
    out = (
        dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if merge_output
        else dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    procs = [
        subprocess.Popen(make_cmd(distributed_args(port, n, i)), text=True, **out, **popen) for i in range(n)
    ]
    texts = [p.communicate(timeout=timeout)[0 if merge_output else 1] for p in procs]
    return [(p.returncode, t) for p, t in zip(procs, texts)]
