"""Preemption: SIGTERM to a toy training loop saves at the next step boundary and exits 0; the resumed run
ends with bitwise the same parameters as an uninterrupted one. Also NonFiniteGuard.

Run as a script, this file is the toy loop: `python tests/test_train_infra_preemption.py WORKDIR STEPS SLEEP`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rskd_jax.train.preemption import NonFiniteGuard, PreemptionHandler, TrainingDiverged


def toy_run(workdir: str, total_steps: int, sleep_s: float = 0.0) -> dict:
    """A tiny resumable nnx + optax + Grain loop using Checkpointer and PreemptionHandler."""
    import grain
    import optax
    from flax import nnx

    from rskd_jax.train.checkpoint import Checkpointer, restore_target

    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    data = (
        grain.MapDataset.range(1000)
        .seed(0)
        .shuffle()
        .map(lambda i: np.arange(8, dtype=np.float32).reshape(2, 4) * (i % 13) / 13.0)
        .to_iter_dataset()
    )
    it = iter(data)
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=2)
    key = jax.random.key(1)
    target = restore_target(
        {
            "nn": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state((model, opt))),
            "key": jax.eval_shape(lambda: key),
        }
    )
    start = 0
    restored = ckpt.restore_latest_valid(target, data_iter=it)
    if restored is not None:
        nnx.update((model, opt), restored.state["nn"])
        key, start = restored.state["key"], restored.step
        print(f"resumed from {start}", flush=True)

    @nnx.jit
    def train_step(model, opt, x, key):
        noise = 0.01 * jax.random.normal(key, x.shape)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x + noise) - 1.0) ** 2))(model)
        opt.update(model, grads)
        return loss

    stopped_at = None
    with PreemptionHandler() as stop:
        for step in range(start + 1, total_steps + 1):
            key, sub = jax.random.split(key)
            loss = train_step(model, opt, jnp.asarray(next(it)), sub)
            print(f"step {step} loss {float(loss):.6f}", flush=True)
            state = {"nn": nnx.state((model, opt)), "key": key}
            if stop.should_stop(step):
                ckpt.save(step, state, data_iter=it, force=True)
                ckpt.wait()
                stopped_at = step
                print(f"preempted at {step}", flush=True)
                break
            if step % 5 == 0:
                ckpt.save(step, state, data_iter=it)
            time.sleep(sleep_s)
    ckpt.close()
    params = {k: np.asarray(v).tolist() for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items()}
    return {"stopped_at": stopped_at, "params": params, "start": start}


def _child(workdir, steps, sleep_s):
    return subprocess.Popen(
        [sys.executable, "-u", __file__, str(workdir), str(steps), str(sleep_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def _result(output: str) -> dict:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def test_sigterm_saves_at_step_boundary_exits_0_and_resumes_exactly(tmp_path):
    steps = 12
    proc = _child(tmp_path, steps, 0.15)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 3 "):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out
    res = _result(out)
    k = res["stopped_at"]
    assert k is not None and 3 <= k < steps, out
    step_lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert step_lines[-1].startswith(f"step {k} ")  # no step ran after the one that saw the signal
    assert os.path.exists(tmp_path / "ckpt" / str(k) / "commit_success.txt")

    # restart the same command: resumes from k and finishes; equals an uninterrupted run bitwise
    resumed = subprocess.run(
        [sys.executable, "-u", __file__, str(tmp_path), str(steps), "0"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    res2 = _result(resumed.stdout)
    assert res2["start"] == k and res2["stopped_at"] is None
    straight = toy_run(str(tmp_path / "straight"), steps)
    assert straight["params"] == res2["params"]


def test_handler_flag_and_restore_previous_handler():
    seen = []
    prev = signal.signal(signal.SIGTERM, lambda *a: seen.append("prev"))
    try:
        with PreemptionHandler() as stop:
            assert stop.mode == "signal" and not stop.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.should_stop(2) and stop.reason == "SIGTERM" and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # the earlier handler is back
        time.sleep(0.01)
        assert seen == ["prev"]
    finally:
        signal.signal(signal.SIGTERM, prev)
    with pytest.raises(RuntimeError, match="jax.distributed"):
        PreemptionHandler(use_jax_sync_point=True).install()


def test_non_finite_guard_counts_and_raises():
    g = NonFiniteGuard(max_in_a_row=3)
    pattern = [True, False, False, True, False, True]
    assert [g.update(i, ok) for i, ok in enumerate(pattern)] == pattern
    assert g.skipped == 3 and g.in_a_row == 0
    assert not g.update(10, jnp.bool_(False)) and not g.update(11, np.False_)
    with pytest.raises(
        TrainingDiverged, match=r"3 consecutive steps \(10\.\.12\).*last saved checkpoint is intact"
    ):
        g.update(12, False)
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


if __name__ == "__main__":
    out = toy_run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    print("RESULT " + json.dumps(out), flush=True)
