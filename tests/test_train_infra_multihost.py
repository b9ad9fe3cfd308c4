"""Multi-host pieces, tested with TWO local CPU processes (gloo collectives, 4 CPU devices each):
a global batch assembled from two per-process halves, a 2-process Checkpointer save/restore of a sharded
pytree + per-process Grain state, and a SIGTERM to one process stopping BOTH at the same step.

Run as a script, this file is one worker: `python tests/test_train_infra_multihost.py PID PORT WORKDIR`.
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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from xla_flags import xla_flags

from rskd_jax.parallel import multihost

GLOBAL_BATCH = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) * 0.37 - 3.0
WEIGHTS = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) / 7.0


def mesh_2x2x2():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def batch_sums(mesh, x):
    """psum of per-shard sums over the batch axes (shard_map), and a plain jitted global sum."""
    psum = jax.jit(
        jax.shard_map(
            lambda b: jax.lax.psum(b.sum(), ("data", "fsdp")),
            mesh=mesh,
            in_specs=P(("data", "fsdp"), None),
            out_specs=P(),
        )
    )(x)
    return float(psum), float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))


def worker(pid: int, port: int, workdir: str) -> dict:
    import grain

    from rskd_jax.train.checkpoint import Checkpointer, restore_target
    from rskd_jax.train.preemption import PreemptionHandler

    assert multihost.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
    mesh = mesh_2x2x2()
    out = {"pid": pid, "process_count": jax.process_count(), "devices": jax.device_count()}

    # 1. global batch from per-process halves
    idx, count = multihost.process_shard_info(mesh)
    rows = GLOBAL_BATCH.shape[0] // count
    local = GLOBAL_BATCH[idx * rows : (idx + 1) * rows]
    g = multihost.host_local_to_global({"x": local}, mesh)["x"]
    out["shard"] = [idx, count]
    out["global_shape"] = list(g.shape)
    out["sums"] = batch_sums(mesh, g)

    # 2. Checkpointer across both processes: sharded array + typed key + per-process iterator state
    w = jax.make_array_from_callback(
        WEIGHTS.shape, NamedSharding(mesh, P("fsdp", "tensor")), lambda i: WEIGHTS[i]
    )
    kd = jax.random.key_data(jax.random.key(42))
    key = jax.random.wrap_key_data(
        jax.make_array_from_callback(kd.shape, NamedSharding(mesh, P()), lambda i: np.asarray(kd)[i])
    )
    ds = grain.MapDataset.range(100 * pid, 100 * pid + 40).batch(2).to_iter_dataset()
    it = iter(ds)
    next(it), next(it)
    ck = Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=2)
    ck.save(5, {"w": w, "key": key, "step": 5}, data_iter=it, meta={"run": "mh"})
    expected = next(it).tolist()
    ck.wait()
    target = restore_target(
        {
            "w": jax.ShapeDtypeStruct(
                WEIGHTS.shape, jnp.float32, sharding=NamedSharding(mesh, P("data", None))
            ),
            "key": jax.eval_shape(lambda: jax.random.key(0)),
            "step": 0,
        },
        mesh,
    )
    it2 = iter(ds)
    r = ck.restore(target, data_iter=it2)
    rw = r.state["w"]
    out["restore"] = {
        "step": r.step,
        "meta": r.meta,
        "spec": str(rw.sharding.spec),
        "n_local_shards": len(rw.addressable_shards),
        "shards_equal": all(
            np.array_equal(np.asarray(s.data), WEIGHTS[s.index]) for s in rw.addressable_shards
        ),
        "key_equal": bool(np.array_equal(jax.random.key_data(r.state["key"]).addressable_shards[0].data, kd)),
        "next_batch": next(it2).tolist(),
        "expected_batch": expected,
    }

    # 3. SIGTERM to one process: both stop at the same step through JAX's preemption sync point
    with PreemptionHandler() as stop:
        out["preemption_mode"] = stop.mode
        open(os.path.join(workdir, f"ready{pid}"), "w").close()
        for step in range(10, 600):
            jax.block_until_ready(jax.jit(jnp.sum)(g))  # a collective per step, like training
            if stop.should_stop(step):
                ck.save(step, {"w": w, "key": key, "step": step}, force=True)
                ck.wait()
                out["stopped_at"] = step
                break
            time.sleep(0.02)
    out["latest_step"] = ck.latest_step()
    ck.close()
    multihost.sync("done")
    return out


def test_two_processes(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", __file__, str(pid), str(port), str(tmp_path)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in (0, 1)
    ]
    try:
        deadline = time.time() + 90
        while not all(os.path.exists(tmp_path / f"ready{p}") for p in (0, 1)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), (
                "workers did not get ready"
            )
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o
    res = [json.loads([ln for ln in o.splitlines() if ln.startswith("RESULT ")][0][7:]) for o in outputs]

    # single-process reference: the same global batch on this process's 8 devices, and NumPy
    ref_mesh = mesh_2x2x2()
    ref = batch_sums(
        ref_mesh, jax.device_put(GLOBAL_BATCH, NamedSharding(ref_mesh, P(("data", "fsdp"), None)))
    )
    for r in res:
        assert r["process_count"] == 2 and r["devices"] == 8 and r["global_shape"] == [8, 6]
        assert r["sums"] == pytest.approx(ref, rel=1e-6)
        assert r["sums"][0] == pytest.approx(float(GLOBAL_BATCH.astype(np.float64).sum()), rel=1e-5)
        rr = r["restore"]
        assert rr["step"] == 5 and rr["meta"] == {"run": "mh"} and rr["spec"] == str(P("data", None))
        assert rr["n_local_shards"] == 4 and rr["shards_equal"] and rr["key_equal"]
        assert rr["next_batch"] == rr["expected_batch"]
        assert r["preemption_mode"] == "jax"
    assert sorted(tuple(r["shard"]) for r in res) == [(0, 2), (1, 2)]
    assert res[0]["restore"]["next_batch"] != res[1]["restore"]["next_batch"]  # per-process iterator states
    assert res[0]["stopped_at"] == res[1]["stopped_at"] == res[0]["latest_step"] == res[1]["latest_step"]
    assert sorted(os.listdir(tmp_path / "ckpt" / "5" / "data")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


def test_single_process_helpers(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(multihost, "_tpu_chip_count", lambda: 0)
    assert multihost.detect_cluster() is None
    assert multihost.initialize() is False and not multihost.is_initialized()  # no-op on one machine
    monkeypatch.setattr(multihost, "_tpu_chip_count", lambda: 4)
    assert multihost.detect_cluster() == "cloud-tpu-vm"
    monkeypatch.setattr(multihost, "_tpu_chip_count", lambda: 0)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert multihost.detect_cluster() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert multihost.detect_cluster() == "tpu-multislice/gke"
    with pytest.raises(ValueError, match="together"):
        multihost.initialize("127.0.0.1:1234")

    mesh = mesh_2x2x2()
    assert multihost.process_shard_info() == (0, 1) and multihost.process_shard_info(mesh) == (0, 1)
    batch = {"x": GLOBAL_BATCH, "m": np.ones((8,), np.int32)}
    g = multihost.host_local_to_global(batch, mesh)
    assert g["x"].sharding.spec == P(("data", "fsdp"), None) and g["m"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g["x"]), GLOBAL_BATCH)
    g2 = multihost.host_local_to_global(batch, mesh, {"x": P("data", "tensor"), "m": P()})
    assert g2["x"].sharding.spec == P("data", "tensor") and g2["x"].addressable_shards[0].data.shape == (4, 3)
    with pytest.raises(KeyError, match="'m'"):
        multihost.host_local_to_global(batch, mesh, {"x": P()})


if __name__ == "__main__":
    result = worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    print("RESULT " + json.dumps(result), flush=True)
