"""The run's `eval` stage (the embedded demo's report): teacher, student SFT, SFT continued and distilled on rs-synth.

Writes into the run's workdir:
  report.md / report.json   task tables (scene OA/AA, VQA per type + mOA, grounding acc@0.5/0.25, region captions
                            ROUGE), divergence to the teacher, agreement with the teacher's answers,
                            parameters/FLOPs, side by side with the Δ row (distilled − SFT continued)
  distill_curves.png        every loss term of the distillation and the sampled reverse-KL estimate over steps
  eval/<model>/             per-model predictions, confusion matrix and grounding PNGs
"""

from __future__ import annotations

import json
import logging
import pathlib

from rskd_jax.data import eval_batches
from rskd_jax.eval import flops, plots, report, runner
from rskd_jax.eval.agreement import agreement_table, teacher_agreement
from rskd_jax.eval.divergence import divergence_to_teacher
from rskd_jax.train.context import transform_for

log = logging.getLogger("rskd_jax")

NAMES = ("teacher", "student SFT", "student SFT continued", "student distilled")
TEACHER, BEFORE, CONTROL, AFTER = NAMES


def loss_curves(metrics_jsonl: pathlib.Path, out_png: pathlib.Path) -> dict:
    """Plots every `loss/*` term and `rollout/rev_kl_k3` of a run's metrics.jsonl; returns the curves."""
    recs = [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if x.strip()]
    keys = sorted({k for r in recs for k in r if k.startswith("loss/") or k == "rollout/rev_kl_k3"})
    curves = {k: ([r["step"] for r in recs if k in r], [r[k] for r in recs if k in r]) for k in keys}
    if curves:
        plots.plot_loss_curves(curves, out_png, title="distillation: loss terms and sampled reverse KL")
    return curves


def evaluate_split(ctx, model, *, name: str = "model", out_dir=None, limit=None) -> dict:
    """Task metrics of `model` on the run's evaluation split (rs-synth), as configured in `config.eval`."""
    c = ctx.config
    generation = runner.Generation(
        tasks=tuple(c.eval.tasks),
        limit=limit if limit is not None else (c.eval.limit or None),
        batch_size=c.eval.batch_size,
        max_new_tokens=c.eval.max_new_tokens,
        max_prompt_len=c.data.prompt_len,
        progress=False,
    )
    scoring = runner.Scoring(out_dir=out_dir, model_name=name, meteor=False)
    return runner.evaluate(model, ctx.tokenizer_dir, {"rs-synth": ctx.eval_source}, generation, scoring)


def divergences(ctx, students: dict, teacher) -> dict:
    """Token-level KL of each student to the teacher on the evaluation split (training chat template)."""
    c = ctx.config
    n = int(c.eval.get("divergence_limit", 0) or 0)  # records, spread evenly over the split (0 = all)
    source = runner.Subset(ctx.eval_source, runner.spread(len(ctx.eval_source), n))
    out = {}
    for name, model in students.items():
        batches = eval_batches(source, transform_for(ctx, model.cfg), c.eval.batch_size)
        out[name] = divergence_to_teacher(
            model, teacher, batches, max_new_tokens=c.sampling.max_new_tokens, seed=c.seed
        )
    return out


def final_report(ctx, *, teacher, before, after, distill_dir, control=None) -> dict:
    """Evaluates the teacher, the student SFT checkpoint (the common start), `control` (that checkpoint continued
    with plain SFT for the distillation's steps; left out when None) and the distilled student; the Δ row is
    distilled − SFT continued (distilled − SFT without a control): did distillation help?"""
    c = ctx.config
    wd = ctx.workdir
    models = {TEACHER: teacher, BEFORE: before, CONTROL: control, AFTER: after}
    models = {n: m for n, m in models.items() if m is not None}
    results = {}
    dirs = {name: wd / "eval" / name.replace(" ", "_") for name in models}
    for name, model in models.items():
        log.info("evaluating %s on %s", name, ctx.eval_source)
        res = evaluate_split(ctx, model, name=name, out_dir=dirs[name])
        res["params_flops"] = flops.params_flops_metrics(model.cfg, c.data.seq_len)
        results[name] = res
    div = divergences(ctx, {n: m for n, m in models.items() if n != TEACHER}, teacher)
    curves = loss_curves(pathlib.Path(distill_dir) / "metrics.jsonl", wd / "distill_curves.png")
    base = CONTROL if CONTROL in models else BEFORE
    md = report.markdown_report(
        results,
        title="rs-synth: teacher, student SFT, SFT continued (no teacher) and distilled for the same steps",
        delta=(base, AFTER),
    )
    md += "\n" + divergence_table(div) + "\n"
    agree = teacher_agreement(dirs[TEACHER], {n: d for n, d in dirs.items() if n != TEACHER})
    md += "\n" + agreement_table(agree) + "\n"
    if curves:
        md += "\n![distillation curves](distill_curves.png)\n"
    (wd / "report.md").write_text(md)
    report.write_json(
        dict(results=results, divergence=div, agreement=agree, curves=curves), wd / "report.json"
    )
    log.info("report: %s\n%s", wd / "report.md", md)
    return dict(results=results, divergence=div, agreement=agree)


def divergence_table(div: dict) -> str:
    rows = [
        "### Divergence to the teacher (rs-synth evaluation split; lower is closer)",
        "",
        "| model | reverse KL, student samples | reverse KL, ground truth | forward KL, ground truth |",
        "|---|---|---|---|",
    ]
    for name, d in div.items():
        fmt = lambda k, d=d: f"{d[k]:.4f}" if k in d else "-"
        rows.append(f"| {name} | {fmt('rkl_sampled')} | {fmt('rkl_gt')} | {fmt('fkl_gt')} |")
    rows.append("")
    rows.append(
        "Exact token-level KL over the full vocabulary: on responses sampled from the student (temperature 1, "
        "the quantity distillation minimises) and teacher-forced on the reference answers."
    )
    return "\n".join(rows)
