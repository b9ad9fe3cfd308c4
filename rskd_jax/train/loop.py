"""The training loop shared by every stage (teacher SFT, student SFT, distillation).

One `fit(job, options)` call: shard the models onto the mesh, build the jitted step (rskd_jax.distill.step), resume from the
newest valid checkpoint in `workdir/checkpoints` (train state + Grain iterator state; a corrupt newest checkpoint
falls back to the previous one), run to `total_steps` with a progress line, metrics to JSONL/TensorBoard, periodic
checkpoints, SIGTERM/preemption -> save at the next step boundary and stop, and non-finite steps skipped (the run
stops after `max_nonfinite_in_a_row` of them, the last good checkpoint intact).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from rskd_jax.build import device_bytes
from rskd_jax.data.pipeline import make_iterator
from rskd_jax.distill import step as S
from rskd_jax.parallel import multihost, place, rules
from rskd_jax.train import checkpoint as ckpt_lib
from rskd_jax.train import preemption, progress, writers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    model: nnx.Module  # the trained model (student side of StudentWithMaps), parameters updated
    maps: nnx.Module  # the feature maps trained with it (dropped at export)
    step: int
    preempted: bool
    history: list  # logged metric dicts


def fingerprint(state) -> str:
    """A short hash of a model's parameters (shapes + a few values): recorded so resume refuses another teacher."""
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_flatten_with_path(state)[0], key=lambda kv: str(kv[0])):
        head = place.gather(x.reshape(-1)[:16]) if isinstance(x, jax.Array) else np.asarray(x).ravel()[:16]
        size = (int(np.prod(np.shape(x))),)  # the flattened shape, as earlier checkpoints recorded it
        h.update(str(path).encode() + str(size).encode() + head.astype(np.float32).tobytes())
    return h.hexdigest()[:16]


def _to_global(batch: dict, mesh) -> dict:
    return multihost.host_local_to_global({k: np.asarray(v) for k, v in batch.items()}, mesh)


@dataclasses.dataclass
class Step:
    """What `build_step` returns: the jitted step, make_train_step's parts, and the initial train state."""

    step: Callable  # (state, frozen, teacher, global batch) -> (state, metrics)
    parts: dict
    state: object


def build_step(model, teacher, spec, optim_cfg, trainable: str, mesh, *, maps=None, seed: int = 0) -> Step:
    """Shards `model` (+ `maps`) and `teacher` onto `mesh` and builds the step `fit` runs; the initial state
    takes over the trainable arrays (`model` is consumed). `launch/plan.py` lowers this same step
    (tests/test_rehearsal.py compares the two programs)."""
    student = S.StudentWithMaps(model, maps)
    with jax.set_mesh(mesh):
        rules.shard_model(student, mesh)
        if teacher is not None:
            rules.shard_model(teacher, mesh)
    tx = S.make_optimizer(optim_cfg)
    with jax.set_mesh(mesh):
        init_fn, step_fn, parts = S.make_train_step(
            student, teacher, spec, tx, trainable, mesh=mesh, donate_params=True
        )
        state = init_fn(parts["params"], jax.random.key(seed))
    return Step(step_fn, parts, state)


@dataclasses.dataclass
class Job:
    """What one `fit` call trains: `model` (+ `maps`) against `teacher` (None for SFT) with the step `spec`
    describes, on `dataset`, to `total_steps`, in `workdir`; `eval_fn(model, step)` every `eval_every` steps."""

    name: str
    workdir: pathlib.Path | str
    model: nnx.Module
    teacher: nnx.Module | None
    spec: S.StepSpec
    optim_cfg: Any
    trainable: str
    total_steps: int
    dataset: Any
    seed: int = 0
    maps: dict | None = None
    eval_fn: Callable | None = None
    eval_every: int = 0


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How every `fit` of a run trains (`rskd_jax.train.run.fit_options` reads them from a config): the mesh,
    logging, checkpointing and fault handling.

    `debug` (config.debug, tests only): {"kill_stage": name, "kill_at_step": k, "kill_signal": "SIGKILL"|"SIGTERM"}
    makes the process signal itself right after step k, to test preemption and crash recovery.
    `log_all_metrics`: every metric on the console line (default: total loss and the main loss terms).
    """

    mesh: Any
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 2  # checkpoints kept
    max_nonfinite_in_a_row: int = 5
    num_workers: int = 0
    config: Any = None  # saved with each checkpoint
    debug: Any = None
    log_all_metrics: bool = False


def fit(job: Job, opts: RunOptions) -> FitResult:
    """Trains `job` with `opts` to `job.total_steps`; see the module docstring."""
    name, mesh = job.name, opts.mesh
    workdir = pathlib.Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    built = build_step(
        job.model, job.teacher, job.spec, job.optim_cfg, job.trainable, mesh, maps=job.maps, seed=job.seed
    )
    parts = built.parts
    teacher_fp = fingerprint(parts["teacher"]) if job.teacher is not None else None
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts["params"]))
    log.info("[%s] %d trainable parameters (%s)", name, n_train, job.trainable)
    log_memory(name, built.state, parts["frozen"], parts["teacher"])

    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=opts.keep)
    data_it = iter(job.dataset) if opts.num_workers == 0 else make_iterator(job.dataset, opts.num_workers)
    state, start = _resume(ckpt, built.state, data_it, mesh, teacher_fp, workdir, name)
    history = _read_history(workdir, upto=start)
    writer = writers.create_default_writer(str(workdir), console=False)
    handler = preemption.PreemptionHandler().install()
    meta = dict(teacher_fingerprint=teacher_fp, stage=name)
    try:
        state, step, preempted = _train(
            job, opts, built.step, parts, state, start, data_it, (writer, ckpt, handler), history, meta
        )
    finally:
        writer.close()
        handler.close()
        if hasattr(data_it, "close"):
            data_it.close()
        ckpt.close()  # waits for the last save; raises CheckpointSaveError if it failed
    merged = _merged(parts, state)
    return FitResult(model=merged.model, maps=merged.maps, step=step, preempted=preempted, history=history)


def _resume(ckpt, state, data_it, mesh, teacher_fp, workdir, name: str):
    """(state, step) from the newest valid checkpoint (restoring the data iterator too), else (state, 0);
    refuses a checkpoint trained against another teacher."""
    abstract = ckpt_lib.restore_target(jax.eval_shape(lambda: state), mesh)
    restored = ckpt.restore_latest_valid(abstract, data_iter=data_it)
    if restored is None:
        return state, 0
    saved_fp = (restored.meta or {}).get("teacher_fingerprint")
    if teacher_fp is not None and saved_fp not in (None, teacher_fp):
        raise ValueError(
            f"{workdir}: checkpoint step {restored.step} was trained against teacher {saved_fp}, "
            f"this run's teacher is {teacher_fp}; use a new --workdir or the original teacher"
        )
    log.info("[%s] resumed from step %d (%s)", name, int(restored.step), ckpt.step_dir(int(restored.step)))
    return restored.state, int(restored.step)


def _train(job: Job, opts: RunOptions, step_fn, parts, state, start, data_it, io, history, meta):
    """The steps from `start` to `job.total_steps` (or a stop request) -> (state, last step, preempted)."""
    writer, ckpt, handler = io
    name, mesh, total_steps = job.name, opts.mesh, job.total_steps
    frozen, t_state = parts["frozen"], parts["teacher"]
    prog = progress.Progress(total_steps, every=opts.log_every, start_step=start, prefix=f"[{name}] ")
    guard = preemption.NonFiniteGuard(opts.max_nonfinite_in_a_row)
    avg = writers.Averages()
    step = start
    while step < total_steps:
        batch = next(data_it)
        tokens = float(np.asarray(batch["attention_mask"]).sum())
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, frozen, t_state, _to_global(batch, mesh))
        metrics = jax.device_get(metrics)
        step += 1
        ok = guard.update(step, float(metrics["skipped"]) == 0.0)
        if ok:
            avg.update({k: float(v) for k, v in metrics.items()})
        prog.update(step, progress.console_metrics(metrics, opts.log_all_metrics), tokens=tokens)
        if step % opts.log_every == 0 or step == total_steps:
            scalars = dict(avg.compute(), skipped_total=guard.skipped)
            avg.reset()
            writer.write_scalars(step, scalars)
            history.append(dict(step=step, **scalars))
        if job.eval_fn is not None and job.eval_every and step % job.eval_every == 0:
            writer.write_scalars(step, job.eval_fn(_merged(parts, state).model, step))
        _debug_kill(opts.debug, name, step)
        stop = handler.should_stop(step)
        if ok and (step % opts.ckpt_every == 0 or step == total_steps or stop):
            ckpt.save(step, state, data_iter=data_it, config=opts.config, meta=meta, force=stop)
        if stop:
            log.warning("[%s] stop requested (%s): saved step %d, exiting", name, handler.reason, step)
            return state, step, True
    return state, step, False


def memory_table(state, frozen, teacher) -> dict[str, tuple[int, int]]:
    """{part: (bytes on the fullest local device, total bytes)} of what a step keeps on the devices."""

    maps = {k: v for k, v in state.params.items() if k == "maps"} if hasattr(state.params, "items") else {}
    trained = {k: v for k, v in state.params.items() if k != "maps"} if maps else state.params
    return {
        "student (trainable)": device_bytes(trained),
        "student (frozen)": device_bytes(frozen),
        "feature maps": device_bytes(maps),
        "optimizer state": device_bytes(state.opt_state),
        "teacher": device_bytes(teacher),
    }


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def log_memory(name: str, state, frozen, teacher) -> None:
    """Logs per-device bytes of each part (the plan's `launch/plan.py` compiles the same step: compare there)."""
    table = memory_table(state, frozen, teacher)
    n = max(1, len(jax.local_devices()))
    parts = ", ".join(
        f"{k} {_size(dev)}/device (even share {_size(tot / jax.device_count())})"
        for k, (dev, tot) in table.items()
        if tot
    )
    peak = sum(dev for dev, _ in table.values())
    log.info(
        "[%s] device memory of parameters and optimizer: %s; total <= %s/device on %d local devices",
        name,
        parts,
        _size(peak),
        n,
    )


def _merged(parts, state) -> S.StudentWithMaps:
    return nnx.merge(parts["graphdef"], state.params, parts["frozen"])


def _read_history(workdir: pathlib.Path, upto: int) -> list:
    """Logged metrics up to step `upto`; on resume, later entries (logged before a crash, about to be
    recomputed) are dropped from metrics.jsonl so the curve has one entry per step."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= upto:
            out.append(rec)
    if jax.process_index() == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in out))
        tmp.replace(path)
    return out


def _debug_kill(debug, name: str, step: int):
    if debug and debug.get("kill_stage") == name and debug.get("kill_at_step") == step:
        sig = getattr(signal, debug.get("kill_signal", "SIGKILL"))
        log.warning("[%s] debug: sending %s to myself after step %d", name, sig.name, step)
        os.kill(os.getpid(), sig)
        time.sleep(0.5)  # SIGTERM: the handler sets the flag; SIGKILL never returns
