r"""Cost of the checkpoint damage check: per-array checksums at save (what Checkpointer does) against a full
read-back of the saved arrays (the alternative), on the demo's distillation state (configs/distill.py:demo and
:tiny train the same models) or a synthetic state of a given size.

    python bench/checkpoint.py --state /tmp/run/distill/checkpoints/6/state     # a demo run's saved state
    python bench/checkpoint.py --mib 512                                          # synthetic float32 state

Prints milliseconds (median of --reps) for: checksums (first call, with its compile; then steady), one save
(blocking, sync), one full restore (= the read-back a verify-after-save would add).
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from rskd_jax.train import checkpoint as C  # noqa: E402


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(1e3 * (time.perf_counter() - t))
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--state", help="a saved orbax `state` directory (e.g. a demo run's distill step)")
    p.add_argument("--mib", type=float, default=0, help="synthetic float32 state of this size (16 arrays)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.state:
        with ocp.PyTreeCheckpointer() as c:  # as numpy: the state may have been saved on other devices
            meta = c.metadata(a.state)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = jax.tree.map(jnp.asarray, c.restore(a.state, restore_args=args))
    else:
        n = int(a.mib * 2**20 / 4 / 16)
        state = {f"w{i}": jax.random.normal(jax.random.key(i), (n,)) for i in range(16)}
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    nbytes = sum(x.nbytes for x in leaves)
    t0 = time.perf_counter()
    C.array_checksums(state)
    first = 1e3 * (time.perf_counter() - t0)
    steady = timed(lambda: C.array_checksums(state), a.reps)
    tmp = tempfile.mkdtemp()
    target = C.restore_target(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    k = iter(range(1, 10**6))
    with C.Checkpointer(tmp, max_to_keep=2, async_save=False) as ck:
        save = timed(lambda: ck.save(next(k), state), a.reps)
        restore = timed(lambda: ck.restore(target).state, a.reps)
    shutil.rmtree(tmp)
    print(
        f"{len(leaves)} arrays, {nbytes / 2**20:.1f} MiB ({jax.devices()[0].platform}): checksums first "
        f"{first:.0f} ms (with compile), steady {steady:.1f} ms; save (sync, incl. checksums) {save:.0f} ms; "
        f"full read-back {restore:.0f} ms"
    )


if __name__ == "__main__":
    main()
