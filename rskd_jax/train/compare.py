"""A controlled comparison of distillation methods (`launch/compare.py --config configs/compare.py`).

One trained teacher and one SFT student are the common start (trained once in the workdir, or reused from an
existing demo workdir with `compare.start`). Then every method of `compare.methods` continues that student for
the same `total_steps`, the same optimiser, the same data order (data seed `seed + 1000 + k` for seed index k,
whatever the method) and the same evaluation (`final_eval.evaluate_split` task metrics + the reverse / forward
KL to the teacher, `final_eval.divergences`), once per seed of `compare.seeds`. Each method x seed has its own
sub-directory `<method>/seed<k>/` (checkpoints, metrics.jsonl, kl_curve.jsonl, result.json); a rerun skips the
finished ones and resumes the others from their checkpoints. The table and figure: rskd_jax.train.compare_report.

A method is a kind plus config overrides (`METHODS`): `sft` and `seqkd` train with cross-entropy only and get
no teacher at all (seqkd on the teacher's greedy answers to the training prompts, generated once and cached in
`seqkd_answers.json`); the others run the distillation step of configs/distill.py with some terms switched.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pathlib
import time

import jax

from rskd_jax.data import eval_batches
from rskd_jax.eval import report as report_lib
from rskd_jax.eval.divergence import divergence_to_teacher
from rskd_jax.eval.generate import Generator
from rskd_jax.train import compare_report, loop
from rskd_jax.train import run as run_lib
from rskd_jax.train.context import transform_for
from rskd_jax.train.final_eval import divergences, evaluate_split

log = logging.getLogger("rskd_jax")

NO_FEAT = {"loss.weights.feat_image": 0.0, "loss.weights.feat_text": 0.0, "loss.weights.feat_proj": 0.0}
# MiniLLM's released code (microsoft/LMOps minillm/, ../shared/reference/minillm.md section 1.7): A_t = G_t / n_t
# (current token included, gamma 0.95, always length normalised), whitened; ratio clip 0.2 with the importance
# weight inside; loss = pg + reg (single step) + lm_coef 1 x (0.5 CE + 0.5 FKL); alpha 0.2; global-norm clip
# 1.0. Pinned, so that a change of the recipe's defaults does not change this method.
MINILLM_CODE = {
    "loss.gamma": 0.95,
    "loss.include_current": True,
    "loss.whiten": True,
    "loss.length_norm": True,
    "loss.clip_eps": 0.2,
    "loss.divergence": "rkl",
    "loss.weights.rkl": 1.0,
    "loss.weights.pg": 1.0,
    "loss.weights.sft": 0.5,
    "loss.weights.fkl": 0.5,
    "sampling.alpha": 0.2,
    "optim.grad_clip": 1.0,
}
GT_ONLY = {"loss.weights.rkl": 0.0, "loss.weights.pg": 0.0, **NO_FEAT}


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str  # "sft" (cross-entropy, no teacher), "seqkd" (cross-entropy on teacher answers), "distill"
    overrides: dict  # dotted config key -> value, applied to the config's distillation setting ("full")
    about: str


METHODS = {
    "sft": Method(
        "sft", {}, "SFT continued on the reference answers (no teacher): the 'more training' control"
    ),
    "word_kd": Method(
        "distill",
        {**GT_ONLY, "loss.weights.sft": 0.5, "loss.weights.fkl": 0.5},
        "word-level KD: 0.5 CE + 0.5 forward KL to the teacher on the reference answers, no sampling",
    ),
    "seqkd": Method("seqkd", {}, "SeqKD: SFT on the teacher's greedy answers to the training prompts"),
    "minillm": Method(
        "distill",
        dict(NO_FEAT),
        "MiniLLM: single-step reverse KL + long-term PG on teacher-mixed samples (+ CE/FKL), no feature terms",
    ),
    "full": Method(
        "distill", {}, "the full method: MiniLLM + cross-modal feature alignment (the demo's loss)"
    ),
    "no_feat_image": Method(
        "distill", {"loss.weights.feat_image": 0.0}, "full without image-token alignment"
    ),
    "no_feat_text": Method("distill", {"loss.weights.feat_text": 0.0}, "full without answer-token alignment"),
    "alpha0": Method(
        "distill", {"sampling.alpha": 0.0}, "full without teacher mixing (pure student samples)"
    ),
    "no_single_step": Method(
        "distill",
        {"loss.weights.rkl": 0.0, "loss.include_current": True},
        "full without single-step decomposition: the PG return includes the current token, no exact term",
    ),
    "minillm_code": Method(
        "distill",
        {**NO_FEAT, **MINILLM_CODE},
        "MiniLLM as its released code runs it: PG return from the current token, gamma 0.95, whitened "
        "advantages (+ the paper's length norm, importance weight inside the 0.2 ratio clip), no feature terms",
    ),
    "no_pg": Method("distill", {"loss.weights.pg": 0.0}, "full without the long-term policy-gradient term"),
    "no_length_norm": Method("distill", {"loss.length_norm": False}, "full with unnormalised PG returns"),
    "clip10": Method(
        "distill",
        {"optim.grad_clip": 10.0},
        "full with the global-norm clip above the distillation gradient norm (2-5): tuning check, results.md",
    ),
    "sft1_pg025": Method(
        "distill",
        {"loss.weights.sft": 1.0, "loss.weights.pg": 0.25},
        "full with twice the CE weight and a quarter of the PG weight: tuning check, docs/results.md",
    ),
    "sft1_nopg": Method(
        "distill",
        {"loss.weights.sft": 1.0, "loss.weights.pg": 0.0},
        "full with twice the CE weight and no PG term: tuning check, docs/results.md",
    ),
    "whiten": Method(
        "distill",
        {"loss.whiten": True},
        "full with whitened PG advantages (a baseline, as MiniLLM's code): tuning check, docs/results.md",
    ),
    "skew_fkl": Method(
        "distill", {"loss.divergence": "skew_fkl"}, "full with DistiLLM's skew forward KL as single-step term"
    ),
    "skew_rkl": Method(
        "distill", {"loss.divergence": "skew_rkl"}, "full with DistiLLM's skew reverse KL as single-step term"
    ),
    "jsd": Method("distill", {"loss.divergence": "jsd"}, "full with GKD's JSD(0.5) as single-step term"),
}
TEACHERLESS = ("sft", "seqkd")


def check_methods(names) -> None:
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise KeyError(f"config compare.methods: unknown {bad}; expected names from {', '.join(METHODS)}")


def method_config(config, name: str):
    """A copy of `config` with the method's overrides applied (the schedule follows `total_steps`)."""
    c = config.copy_and_resolve_references()
    c.update_from_flattened_dict(METHODS[name].overrides)
    return c


def data_seed(config, k: int) -> int:
    """The data-order seed of seed index `k`: the same for every method."""
    return int(config.seed) + 1000 + int(k)


# ----------------------------------------------------------------------------------------------- seqkd data
class TeacherAnswers:
    """A training source whose answers are replaced by the teacher's (`answers`: index -> text)."""

    def __init__(self, base, answers: dict):
        self.base, self.answers = base, answers
        self.name = getattr(base, "name", "source") + "+teacher"

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"TeacherAnswers({self.base!r}, {len(self.answers)} answers)"

    def __getitem__(self, index: int) -> dict:
        rec = dict(self.base[int(index)])
        conv = [dict(t) for t in rec["conversations"]]
        conv[-1]["value"] = self.answers[int(index)]
        rec["conversations"] = conv
        return rec


def teacher_answers(ctx, teacher, path: pathlib.Path) -> dict:
    """Greedy answers of the teacher to every training prompt (training template), cached in `path`."""
    if path.exists():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    c = ctx.config
    t0 = time.perf_counter()
    gen = Generator(teacher, ctx.tokenizer_dir, c.sampling.max_new_tokens, c.eval.batch_size, bucket=None)
    out = {}
    for batch, _ in eval_batches(ctx.train_source, transform_for(ctx, teacher.cfg), c.eval.batch_size):
        ids = [int(i) for i in batch["example_id"]]
        for i, text in zip(ids, gen(batch)):
            if i >= 0:
                out[i] = text
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(out.items())}))
    tmp.replace(path)
    log.info("seqkd: %d teacher answers in %.1f s -> %s", len(out), time.perf_counter() - t0, path)
    return out


# ----------------------------------------------------------------------------------------------- one run
def kl_to_teacher(ctx, model, teacher, batches) -> dict:
    """Sampled reverse KL and reference-answer reverse / forward KL of `model` to the teacher on `batches`."""
    d = divergence_to_teacher(
        model, teacher, batches, max_new_tokens=ctx.config.sampling.max_new_tokens, seed=ctx.config.seed
    )
    return {k: d[k] for k in ("rkl_sampled", "rkl_gt", "fkl_gt") if k in d}


def kl_probe(ctx, teacher, batches, curve_path: pathlib.Path):
    """The training loop's eval hook: KL to the teacher on a fixed slice of the eval split, appended to
    `curve_path` (one JSON line per step)."""

    def fn(model, step):
        rec = {"step": int(step), **kl_to_teacher(ctx, model, teacher, batches)}
        with curve_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return {f"kl/{k}": v for k, v in rec.items() if k != "step"}

    return fn


def read_curve(path: pathlib.Path, upto: int) -> list:
    if not path.exists():
        return []
    recs = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["step"] <= upto:
            recs[r["step"]] = r
    return [recs[s] for s in sorted(recs)]


def evaluate(ctx, model, teacher, out_dir: pathlib.Path) -> dict:
    """Task metrics + KL to the teacher of one model (the same evaluation for every method)."""
    c = ctx.config
    res = evaluate_split(ctx, model, name=out_dir.name, out_dir=out_dir / "eval", limit=c.compare.eval_limit)
    res = {k: v for k, v in res.items() if isinstance(v, dict)}
    if teacher is not None:
        res["divergence"] = divergences(ctx, {"m": model}, teacher)["m"]
    return res


def train_method(ctx, name: str, k: int, student0, teacher, kl_batches, answers=None):
    """Trains one copy of the start student with method `name`, seed index `k` -> loop.FitResult."""
    cfg = method_config(ctx.config, name)
    cfg.seed = int(ctx.config.seed) + 100 * (int(k) + 1)  # sampling / dropout / feature-map init
    rctx = dataclasses.replace(ctx, config=cfg)
    kind = METHODS[name].kind
    wd = ctx.workdir / name / f"seed{k}"
    student = run_lib.copy_model(student0)
    maps = None
    if kind == "distill":
        spec, maps = run_lib.distill_setup(cfg, student, teacher)
        t = teacher
    else:  # cross-entropy only: no teacher in the step at all
        spec, t = run_lib.sft_setup(cfg, student), None
    if kind == "seqkd":
        rctx = dataclasses.replace(rctx, train_source=TeacherAnswers(ctx.train_source, answers))
    job = loop.Job(
        name=f"{name}/seed{k}",
        workdir=wd,
        model=student,
        teacher=t,
        spec=spec,
        optim_cfg=cfg.optim,
        trainable=cfg.trainable,
        total_steps=cfg.total_steps,
        dataset=run_lib.dataset_for(rctx, student.cfg, data_seed(ctx.config, k)),
        seed=cfg.seed,
        maps=maps,
        eval_fn=kl_probe(ctx, teacher, kl_batches, wd / "kl_curve.jsonl"),
        eval_every=int(ctx.config.compare.kl_every),
    )
    opts = dataclasses.replace(run_lib.fit_options(rctx), ckpt_every=max(int(cfg.total_steps), 1))
    return loop.fit(job, opts)


def run_one(ctx, name: str, k: int, student0, teacher, kl_batches, start_kl: dict, answers=None) -> dict:
    wd = ctx.workdir / name / f"seed{k}"
    done = wd / "result.json"
    if done.exists():
        log.info("[compare] %s seed %d: done before, skipped (%s)", name, k, done)
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    res = train_method(ctx, name, k, student0, teacher, kl_batches, answers)
    if res.preempted:
        raise SystemExit(0)
    t_train = time.perf_counter() - t0
    out = evaluate(ctx, res.model, teacher, wd)
    curve = [dict(start_kl, step=0), *read_curve(wd / "kl_curve.jsonl", res.step)]
    if curve[-1]["step"] != res.step:  # kl_every 0 or not a divisor of total_steps: the end point
        curve.append({"step": int(res.step), **kl_to_teacher(ctx, res.model, teacher, kl_batches)})
    out.update(
        method=name,
        seed=k,
        steps=res.step,
        curve=curve,
        train_s=t_train,
        eval_s=time.perf_counter() - t0 - t_train,
        history=res.history,
    )
    report_lib.write_json(out, done)
    return json.loads(done.read_text())


# ----------------------------------------------------------------------------------------------- the whole
def start_models(ctx):
    """The teacher and the SFT student every method starts from (`compare.start`: an existing demo workdir)."""
    c = ctx.config
    sctx = (
        dataclasses.replace(ctx, workdir=pathlib.Path(c.compare.start).absolute()) if c.compare.start else ctx
    )
    teacher = run_lib.sft_stage(sctx, "teacher", c.teacher, c.seed, "teacher")
    student = run_lib.sft_stage(sctx, "student_sft", c.student, c.seed + 1, "student")
    return teacher, student


def start_result(ctx, name, model, teacher, kl_batches) -> dict:
    path = ctx.workdir / "start" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = evaluate(ctx, model, teacher if model is not teacher else None, path.parent / name)
    if model is not teacher:
        out["start_kl"] = kl_to_teacher(ctx, model, teacher, kl_batches)
    report_lib.write_json(out, path)
    return json.loads(path.read_text())


def compare(config, workdir) -> dict:
    """Runs (or resumes) the whole comparison; writes compare.md / compare.json / compare.png in `workdir`."""
    run_lib.setup_logging()
    c = config
    check_methods(c.compare.methods)
    if c.compare.start:
        start = pathlib.Path(c.compare.start)
        if not (start / "teacher").is_dir() or not (start / "student_sft").is_dir():
            raise FileNotFoundError(
                f"config compare.start={start}: expected a demo workdir with teacher/ and student_sft/"
            )
        if not c.data.tokenizer:
            c.data.tokenizer = str(start / "tokenizer")
    if c.compare.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir).absolute() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    t0 = time.perf_counter()
    if c.compare.report_only:
        return report_only(c, pathlib.Path(workdir))
    ctx = run_lib.prepare(c, workdir)
    run_lib.check_models(ctx)
    teacher, student0 = start_models(ctx)
    batches = eval_batches(ctx.eval_source, transform_for(ctx, student0.cfg), c.eval.batch_size)
    kl_batches = [b for b, _ in itertools.islice(batches, max(int(c.compare.kl_batches), 1))]
    starts = {
        "teacher": start_result(ctx, "teacher", teacher, teacher, kl_batches),
        "student SFT (start)": start_result(ctx, "student_sft", student0, teacher, kl_batches),
    }
    start_kl = starts["student SFT (start)"]["start_kl"]
    answers = None
    if "seqkd" in c.compare.methods:
        answers = teacher_answers(ctx, teacher, ctx.workdir / "seqkd_answers.json")
    runs = [(m, k) for m in c.compare.methods for k in range(int(c.compare.seeds))]
    results = []
    for i, (m, k) in enumerate(runs):
        log.info(
            "[compare] run %d/%d: %s seed %d (%.1f min so far)",
            i + 1,
            len(runs),
            m,
            k,
            (time.perf_counter() - t0) / 60,
        )
        results.append(run_one(ctx, m, k, student0, teacher, kl_batches, start_kl, answers))
    table = compare_report.write(ctx.workdir, results, starts, config=c, wall_s=time.perf_counter() - t0)
    log.info(
        "[compare] done in %.1f min: %s\n%s",
        (time.perf_counter() - t0) / 60,
        ctx.workdir / "compare.md",
        table,
    )
    return dict(results=results, starts=starts)


def report_only(config, workdir: pathlib.Path) -> dict:
    """The table and figure from the runs finished so far (`compare.report_only`: nothing is trained)."""
    starts = {}
    for name, label in (("teacher", "teacher"), ("student_sft", "student SFT (start)")):
        path = workdir / "start" / f"{name}.json"
        if path.exists():
            starts[label] = json.loads(path.read_text())
    results = []
    for m in config.compare.methods:
        for k in range(int(config.compare.seeds)):
            path = workdir / m / f"seed{k}" / "result.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
    log.info("[compare] report of %d finished runs in %s", len(results), workdir)
    compare_report.write(workdir, results, starts, config=config)
    return dict(results=results, starts=starts)
