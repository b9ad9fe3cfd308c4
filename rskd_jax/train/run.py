"""What `launch/train.py` runs: the stages a config asks for, each resumable from its workdir.

Stages (each in its own sub-directory of the workdir, each resuming from its own checkpoints):
  teacher       fine-tune the teacher on the training data (the demo's tiny teacher; skipped when
                `teacher.checkpoint` names a converted model and `teacher.sft_steps` is 0)
  student_sft   the "student before distillation" baseline (MiniLLM phase 1; skipped likewise)
  student_sft_more  the control (`sft_control`): the student SFT checkpoint continued with plain SFT, no
                teacher, for the distillation's steps, data order and lr schedule
  distill       the full method (configs/distill.py: loss weights, sampling, trainable subset)
  eval          teacher / student SFT / SFT continued / distilled on the evaluation split -> report.md + .json

A stage whose checkpoints already reach its step count is not re-run: its final checkpoint is restored.
`stage="eval"` (`--stage eval`) only evaluates: it refuses, before loading anything, when a stage the config
asks for has not reached its step count (`check_trained`).
"""

from __future__ import annotations

import logging
import pathlib
import sys
import time

import jax
from flax import nnx

from rskd_jax import build
from rskd_jax.convert import export_model
from rskd_jax.data import InstructSource, SynthSource, load_tokenizer, make_dataset, special_ids
from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.distill import step as S
from rskd_jax.distill.checks import ConfigError, check_config
from rskd_jax.eval import report as report_lib
from rskd_jax.models import LoRAConfig, apply_lora, without_lora
from rskd_jax.parallel import mesh as mesh_lib
from rskd_jax.parallel import multihost
from rskd_jax.train import loop
from rskd_jax.train.checkpoint import committed_steps
from rskd_jax.train.context import Context, transform_for
from rskd_jax.train.final_eval import evaluate_split, final_report

log = logging.getLogger("rskd_jax")

SFT_CONTROL = "student_sft_more"  # the control stage's sub-directory and name


def setup_logging():
    """INFO logs to stderr (absl's handler when launched through absl, else a plain one); library noise muted."""
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("jax._src", "orbax", "grain", "absl"):  # orbax logs through absl at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------- data
def make_sources(config, image_size: int):
    d = config.data
    if d.name == "rs-synth":
        opts = dict(d.get("synth") or {})  # SynthSource options: geometry, task mix, the eval split's cycle
        tasks = dict(opts.pop("tasks", None) or {}) or None
        cycle = dict(task_cycle=tuple(opts.pop("eval_cycle", ())), cycle_block=opts.pop("eval_block", 1))
        common = dict(image_size=image_size, seed=config.seed, tasks=tasks, **opts)
        return (
            SynthSource(d.train_size, split="train", **common),
            SynthSource(d.eval_size, split="val", **common, **cycle),
        )
    if d.name == "geochat_instruct":
        if not d.instruct_json:
            raise KeyError(
                "config data.instruct_json: path of GeoChat_Instruct.json is required for "
                "data.name='geochat_instruct'"
            )
        return InstructSource(d.instruct_json, image_root=d.image_root), None
    raise KeyError(f"config data.name={d.name!r}: expected 'rs-synth' or 'geochat_instruct'")


def run_mesh(config):
    """The config's mesh over all devices; a shape that does not fit the devices or the global batch is a
    ValueError naming the config keys (raised before anything is loaded)."""
    m = config.mesh
    try:
        mesh = mesh_lib.make_mesh((m.data, m.fsdp, m.tensor))
    except ValueError as e:
        raise ValueError(f"config mesh.data/fsdp/tensor = {m.data}/{m.fsdp}/{m.tensor}: {e}") from e
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    b, accum = int(config.data.batch_size), int(config.optim.get("grad_accum", 1) or 1)
    if b % n_batch or b % accum:
        raise ValueError(
            f"config data.batch_size={b} must be divisible by mesh data*fsdp={n_batch} and by "
            f"optim.grad_accum={accum}"
        )
    return mesh


def prepare(config, workdir) -> Context:
    workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
    mesh = run_mesh(config)
    workdir.mkdir(parents=True, exist_ok=True)
    if (
        config.get("teacher")
        and config.teacher.checkpoint
        or config.get("student")
        and config.student.checkpoint
        or config.get("model")
        and config.model.checkpoint
    ) and not config.data.tokenizer:
        raise KeyError(
            "config data.tokenizer: give the tokenizer directory of the converted checkpoints (e.g. the "
            "checkpoint directory itself); without it a small rs-synth tokenizer would be trained whose "
            "ids do not match the checkpoint's vocabulary"
        )
    tok_dir = pathlib.Path(config.data.tokenizer) if config.data.tokenizer else workdir / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        if config.data.tokenizer:
            raise FileNotFoundError(f"config data.tokenizer={tok_dir}: no tokenizer_config.json there")
        if jax.process_index() == 0:
            log.info("training a %d-token tokenizer on rs-synth -> %s", config.data.vocab_size, tok_dir)
            tmp = tok_dir.with_name(tok_dir.name + ".tmp")
            train_synth_tokenizer(tmp, vocab_size=config.data.vocab_size, seed=config.seed)
            tmp.rename(tok_dir)
    multihost.sync("tokenizer")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    train, evals = make_sources(config, config.data.image_size)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return Context(config, workdir, tok_dir, ids, len(tok), mesh, train, evals)


# ----------------------------------------------------------------------------------------------- models
def model_config(ctx: Context, mc, name: str = "model"):
    """The LlavaConfig config section `mc` builds with this run's tokenizer (rskd_jax.build.resolve)."""
    return build.resolve(ctx.config, mc, name, ctx.ids, ctx.tokenizer_dir)


def check_models(ctx: Context) -> None:
    """Every model section against its checkpoint's metadata and the tokenizer (no weights read), so that a
    mismatched student fails before the teacher is loaded."""
    for name in ("teacher", "student", "model"):
        if ctx.config.get(name) is not None:
            model_config(ctx, ctx.config[name], name)


def build_model(ctx: Context, mc, seed: int, name: str = "model"):
    """The model config section `mc` names (a checkpoint, or a random init for the demo), in its sharding."""
    t0 = time.perf_counter()
    model = build.build_model(
        ctx.config, mc, name, mesh=ctx.mesh, seed=seed, ids=ctx.ids, tokenizer_dir=ctx.tokenizer_dir
    )
    dev, tot = build.device_bytes(nnx.state(model))
    log.info(
        "%s: %s in %.1f s, %.3f GiB (%.3f GiB on the fullest device)",
        name,
        f"loaded {mc.checkpoint}" if mc.checkpoint else f"initialised ({mc.preset})",
        time.perf_counter() - t0,
        tot / 2**30,
        dev / 2**30,
    )
    return model


def dataset_for(ctx: Context, cfg, seed: int):
    d = ctx.config.data
    shard, count = multihost.process_shard_info(ctx.mesh)
    return make_dataset(
        ctx.train_source,
        transform_for(ctx, cfg),
        batch_size=d.batch_size // count,
        seed=seed,
        shard_index=shard,
        shard_count=count,
        skip_bad_records=d.skip_bad_records,
    )


# ----------------------------------------------------------------------------------------------- stages
def fit_options(ctx: Context) -> loop.RunOptions:
    """How every stage of the run trains (mesh, logging, checkpointing, fault handling), from its config."""
    c = ctx.config
    return loop.RunOptions(
        mesh=ctx.mesh,
        log_every=c.log_every,
        ckpt_every=c.ckpt_every,
        keep=c.keep_checkpoints,
        max_nonfinite_in_a_row=c.max_nonfinite_in_a_row,
        num_workers=c.data.num_workers,
        config=c,
        debug=c.get("debug"),
        log_all_metrics=bool(c.get("log_all_metrics", False)),
    )


def sft_stage(ctx: Context, name: str, mc, seed: int, section: str):
    """Fine-tunes the model of config section `mc` (teacher or student) with cross-entropy on the answers."""
    model = build_model(ctx, mc, seed, section)
    if mc.sft_steps <= 0:
        return model
    optim = ctx.config.optim.copy_and_resolve_references()
    optim.update(lr=mc.lr, total_steps=mc.sft_steps, warmup_steps=min(optim.warmup_steps, mc.sft_steps // 10))
    trainable = mc.get("trainable", "all+vision")
    if trainable == "lora":
        add_lora(ctx.config, model)
    job = loop.Job(
        name=name,
        workdir=ctx.workdir / name,
        model=model,
        teacher=None,
        spec=S.sft_spec(ctx.config, model.cfg),
        optim_cfg=optim,
        trainable=trainable,
        total_steps=mc.sft_steps,
        dataset=dataset_for(ctx, model.cfg, seed),
        seed=seed,
    )
    res = loop.fit(job, fit_options(ctx))
    if res.preempted:
        raise SystemExit(0)
    return res.model


def distill_setup(config, student, teacher):
    """(spec, feature maps) of the distillation step; adds the LoRA adapters to `student` when configured."""
    spec = S.spec_from_config(config, student.cfg)
    maps = S.maps_for_spec(spec, student.cfg, teacher.cfg, nnx.Rngs(config.seed + 7))
    if config.trainable == "lora":
        add_lora(config, student)
    return spec, maps


def sft_setup(config, student):
    """The cross-entropy-only step spec (no teacher) of a run's student; adds the LoRA adapters when configured."""
    if config.trainable == "lora":
        add_lora(config, student)
    return S.sft_spec(config, student.cfg)


def distill_stage(ctx: Context, student, teacher):
    c = ctx.config
    spec, maps = distill_setup(c, student, teacher)
    job = loop.Job(
        name="distill",
        workdir=ctx.workdir / "distill",
        model=student,
        teacher=teacher,
        spec=spec,
        optim_cfg=c.optim,
        trainable=c.trainable,
        total_steps=c.total_steps,
        dataset=dataset_for(ctx, student.cfg, c.seed + 2),
        seed=c.seed + 2,
        maps=maps,
        eval_fn=periodic_eval(ctx),
        eval_every=c.eval_every,
    )
    res = loop.fit(job, fit_options(ctx))
    if res.preempted:
        raise SystemExit(0)
    return res


def sft_control_stage(ctx: Context, student):
    """The control for "more training": the student SFT checkpoint continued with plain SFT (no teacher) for
    the distillation's steps, with its data order (dataset seed), lr schedule (`optim`) and trainable subset,
    in `student_sft_more/`. Consumes `student` (pass a copy); the teacher is never built or called here."""
    c = ctx.config
    job = loop.Job(
        name=SFT_CONTROL,
        workdir=ctx.workdir / SFT_CONTROL,
        model=student,
        teacher=None,
        spec=sft_setup(c, student),
        optim_cfg=c.optim,
        trainable=c.trainable,
        total_steps=c.total_steps,
        dataset=dataset_for(ctx, student.cfg, c.seed + 2),  # the distill stage's seed: the same batches
        seed=c.seed + 2,
    )
    res = loop.fit(job, fit_options(ctx))
    if res.preempted:
        raise SystemExit(0)
    return res.model


def sft_only(ctx: Context):
    """configs/sft.py: fine-tune `config.model`, then evaluate it (report.md / report.json)."""
    c = ctx.config
    model = sft_stage(ctx, "sft", c.model, c.seed, "model")
    if ctx.eval_source is None:
        return None
    res = evaluate_split(ctx, model, out_dir=ctx.workdir / "eval")
    report_lib.write_report({"model": res}, ctx.workdir, name="report", title="rs-synth: fine-tuned model")
    return res


def export_student(ctx: Context, model):
    """The distilled student (LoRA merged, feature maps dropped) as a transformers-loadable LLaVA directory.

    Multi-process runs gather one tensor block at a time; process 0 writes."""
    dst = ctx.workdir / "student_hf"
    t0 = time.perf_counter()
    export_model(model, model.cfg, dst, tokenizer_dir=ctx.tokenizer_dir, overwrite=True)
    multihost.sync("export")
    log.info(
        "distilled student exported in %.1f s (Hugging Face LlavaForConditionalGeneration format): %s",
        time.perf_counter() - t0,
        dst,
    )


def keep_before(ctx: Context, model):
    """A copy of the student before distillation, for the report (full fine-tuning changes its weights)."""
    dev, tot = build.device_bytes(nnx.state(model))
    log.info(
        "keeping a copy of the student before distillation for the report: %.3f GiB (%.3f GiB/device)",
        tot / 2**30,
        dev / 2**30,
    )
    return copy_model(model)


def add_lora(config, model):
    lo = config.lora
    apply_lora(
        model,
        LoRAConfig(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=tuple(lo.targets)),
        rngs=nnx.Rngs(config.seed + 11),
    )


def periodic_eval(ctx: Context):
    """The training loop's evaluation hook: task metrics of the current student on a slice of the eval split."""
    if ctx.eval_source is None or not ctx.config.eval_every:
        return None
    c = ctx.config

    def fn(model, step):
        res = evaluate_split(ctx, model, limit=min(c.eval.limit or 64, 64))
        return {
            f"eval/{k}/{m}": float(v)
            for k, d in res.items()
            for m, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    return fn


def copy_model(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, state))


ATTENTION_BACKENDS = {"cudnn": "gpu", "splash": "tpu"}  # attention_impl -> the JAX backend it needs


def check_attention_backend(config) -> None:
    """ConfigError when a model section's `overrides.attention_impl` needs another backend than this one."""
    backend = jax.default_backend()
    for name in ("teacher", "student", "model"):
        section = config.get(name)
        impl = section.get("overrides", {}).get("attention_impl") if section is not None else None
        need = ATTENTION_BACKENDS.get(impl)
        if need and backend != need:
            raise ConfigError(
                f"{name}.overrides.attention_impl={impl!r} needs a {need.upper()}, but JAX's backend here is "
                f"{backend!r}: use attention=xla (e.g. --config configs/distill.py:PRESET,attention=xla)"
            )


def stage_steps(config) -> dict[str, int]:
    """The training stages the config asks for, in order, with the step count each trains to."""
    c = config
    if c.get("mode") == "sft":
        steps = {"sft": c.model.sft_steps}
    else:
        steps = {"teacher": c.teacher.sft_steps, "student_sft": c.student.sft_steps}
        if c.get("sft_control", False):
            steps[SFT_CONTROL] = c.total_steps
        steps["distill"] = c.total_steps
    return {name: n for name, n in steps.items() if n > 0}


def check_trained(config, workdir) -> None:
    """`--stage eval` evaluates and never trains: a ValueError naming the first stage of `workdir` whose
    committed checkpoints do not reach its step count, and the command that trains it."""
    for name, steps in stage_steps(config).items():
        ckpt_dir = pathlib.Path(workdir) / name / "checkpoints"
        done = max(committed_steps(ckpt_dir), default=0)
        if done < steps:
            if config.get("mode") == "sft":
                cmd = f"python launch/train.py --config configs/sft.py:... --workdir {workdir}"
            else:
                cmd = (
                    f"python launch/train.py --config configs/distill.py:{config.get('preset', '...')} "
                    f"--workdir {workdir} --stage {name}"
                )
            raise ValueError(
                f"--stage eval only evaluates, and stage {name!r} of {workdir} is not trained "
                f"({ckpt_dir} reaches step {done} of {steps}): train it first with `{cmd}` (with this "
                "run's other --config overrides), then rerun --stage eval"
            )


def run(config, workdir, stage: str = "auto", *, coordinator=None, num_processes=None, process_id=None):
    setup_logging()
    if config.get("mode") != "sft":  # refused configurations fail before any model is loaded
        check_config(config)
    if stage == "eval":
        check_trained(config, workdir)
    multihost.initialize(coordinator, num_processes, process_id)
    check_attention_backend(config)
    t0 = time.perf_counter()
    ctx = prepare(config, workdir)
    c = config
    if stage == "eval" and ctx.eval_source is None:
        raise ValueError(
            f"--stage eval: the training data (data.name={c.data.name!r}) has no evaluation split, so there is "
            "nothing to evaluate here; evaluate the exported model with launch/eval.py instead"
        )
    log.info("workdir %s, mesh %s, %d devices", ctx.workdir, dict(ctx.mesh.shape), jax.device_count())
    check_models(ctx)
    if c.get("mode") == "sft":
        return sft_only(ctx)
    teacher = sft_stage(ctx, "teacher", c.teacher, c.seed, "teacher")
    if stage == "teacher":
        return None
    student = sft_stage(ctx, "student_sft", c.student, c.seed + 1, "student")
    if stage == "student_sft":
        return None
    wants_report = ctx.eval_source is not None and stage in ("auto", "eval")
    control = None
    if c.get("sft_control", False) and stage in ("auto", "eval", SFT_CONTROL):
        control = sft_control_stage(ctx, copy_model(student))
        if stage == SFT_CONTROL:
            return None
    student_before = keep_before(ctx, student) if wants_report and c.trainable != "lora" else None
    res = distill_stage(ctx, student, teacher)  # consumes `student`
    student_after = res.model
    if wants_report and student_before is None:
        student_before = without_lora(student_after)  # the base weights LoRA was trained on: no copy
    if c.get("export_student", True) and stage != "eval":  # the distill stage exported it already
        export_student(ctx, student_after)
    if stage == "distill":
        return None
    report = None
    if ctx.eval_source is not None and stage in ("auto", "eval"):
        report = final_report(
            ctx,
            teacher=teacher,
            before=student_before,
            control=control,
            after=student_after,
            distill_dir=ctx.workdir / "distill",
        )
    log.info("done in %.1f min; results in %s", (time.perf_counter() - t0) / 60, ctx.workdir)
    return report
