"""Export the student of a finished (or stopped) distillation run from its workdir, after the fact.

`launch/convert.py export WORKDIR DST` lands here when WORKDIR is a training workdir (it holds the run's
`config.json`). A distillation checkpoint holds only what the step trains (with LoRA: the adapters and the
feature maps), so the student is rebuilt the way training built it (rskd_jax.build, the same config section,
sharded on this machine's devices), the LoRA adapters added, the trained arrays read into their shards from
the newest complete step (one array at a time, rskd_jax.parallel.place), and the result written as a
transformers `LlavaForConditionalGeneration` directory (LoRA merged, maps dropped). The teacher is never loaded.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import ml_collections
from flax import nnx

from rskd_jax.convert import export_model
from rskd_jax.convert.ckpt import CheckpointReader
from rskd_jax.convert.errors import ConversionError
from rskd_jax.data import load_tokenizer, special_ids
from rskd_jax.parallel import mesh as mesh_lib
from rskd_jax.parallel import multihost, place, rules
from rskd_jax.train import checkpoint as ckpt_lib
from rskd_jax.train import run

log = logging.getLogger(__name__)


def is_workdir(path: str | pathlib.Path) -> bool:
    """True when `path` is a training workdir (its config.json is a training config, not a model's)."""
    f = pathlib.Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "data" in cfg and ("student" in cfg or "model" in cfg)


def newest_step(ckpt_dir: pathlib.Path) -> pathlib.Path:
    """The newest complete step directory (orbax writes `commit_success.txt` last; set-aside steps skipped)."""
    steps = ckpt_lib.committed_steps(ckpt_dir)
    if not steps:
        raise ConversionError(f"{ckpt_dir}: no complete checkpoint step (nothing to export)")
    return ckpt_dir / str(steps[-1])


def restore_trained(model, state_dir: pathlib.Path, prefix: tuple = ("params", "model")) -> int:
    """Reads every parameter of `model` that the training checkpoint `state_dir` holds into its current
    sharding, one array at a time; returns how many were read. Shapes must match (ConversionError if not)."""
    reader = CheckpointReader(state_dir, prefix)
    state = nnx.state(model, nnx.Param)
    count = 0
    for path, var in state.flat_state():
        key = reader.find(path)
        if key is None:
            continue
        stored = tuple(reader.array(path).shape)
        value = var.value
        if stored != tuple(value.shape):
            raise ConversionError(
                f"{state_dir}: {'/'.join(map(str, path))} has shape {stored}, the rebuilt student expects "
                f"{tuple(value.shape)} (was the run's config.json edited after training?)"
            )
        var.set_value(
            place.from_reader(
                value.shape,
                value.dtype,
                value.sharding,
                lambda idx, out, p=path: reader.read_into(p, idx, out),
            )
        )
        count += 1
    nnx.update(model, state)
    return count


def rebuild_student(workdir: str | pathlib.Path, stage: str = "distill"):
    """(model, tokenizer dir, step dir): the student of `workdir`'s `stage` as its newest complete step left
    it, LoRA adapters unmerged, sharded on this process's mesh (the run's `mesh` config)."""

    workdir = pathlib.Path(workdir).absolute()
    if not is_workdir(workdir):
        raise ConversionError(f"{workdir}: not a training workdir (no training config.json)")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    section = "student" if "student" in config else "model"
    step_dir = newest_step(workdir / stage / "checkpoints")
    tok_dir = pathlib.Path(config.data.tokenizer) if config.data.tokenizer else workdir / "tokenizer"
    tok = load_tokenizer(tok_dir)
    m = config.mesh
    mesh = mesh_lib.make_mesh((m.data, m.fsdp, m.tensor))
    ctx = run.Context(config, workdir, tok_dir, special_ids(tok), len(tok), mesh, None, None)
    mc = config[section]
    log.info("rebuilding the %s of %s (%s)", section, workdir, mc.checkpoint or f"random init, {mc.preset}")
    model = run.build_model(ctx, mc, config.seed + (1 if section == "student" else 0), section)
    sft = workdir / "student_sft" / "checkpoints"
    if section == "student" and stage != "student_sft" and mc.get("sft_steps", 0) > 0 and sft.is_dir():
        if mc.get("trainable", "all+vision") == "lora":
            run.add_lora(config, model)
            with jax.set_mesh(mesh):
                rules.shard_model(model, mesh)
        restore_trained(model, newest_step(sft) / "state")
    lora = config.get("trainable") == "lora" if stage == "distill" else mc.get("trainable") == "lora"
    if lora and not _has_lora(model):
        run.add_lora(config, model)
    with jax.set_mesh(mesh):  # the adapters are created unsharded; lay them out as training does
        rules.shard_model(model, mesh)
    n = restore_trained(model, step_dir / "state")
    if n == 0:
        raise ConversionError(
            f"{step_dir}/state: holds no parameter of the {section} (keys params/model/...)"
        )
    log.info("read %d trained arrays from %s", n, step_dir)
    return model, tok_dir, step_dir


def export_run(
    workdir: str | pathlib.Path,
    dst: str | pathlib.Path,
    *,
    stage: str = "distill",
    overwrite: bool = False,
    dtype: str | None = None,
) -> pathlib.Path:
    """The student of `workdir`'s `stage` (newest complete step) -> transformers Llava directory `dst`
    (LoRA merged, maps dropped). Every process takes part; process 0 writes."""

    model, tok_dir, _ = rebuild_student(workdir, stage)
    out = export_model(model, model.cfg, dst, tokenizer_dir=tok_dir, overwrite=overwrite, dtype=dtype)
    if jax.process_count() > 1:
        multihost.sync("export_run")
    return pathlib.Path(out) if out is not None else pathlib.Path(dst)


def _has_lora(model) -> bool:
    return any("lora_a" in map(str, p) for p, _ in nnx.state(model).flat_state())
