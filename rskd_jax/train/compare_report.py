"""The comparison's table and figure: mean ± std over seeds per method (rskd_jax.train.compare).

compare.md / compare.json   one row per method (+ the teacher and the common start): task metrics and the KL
                            to the teacher, mean ± sample std over seeds
compare.png                 bars with error bars per task, and the KL-to-teacher curves over steps
"""

from __future__ import annotations

import datetime
import pathlib
import platform

import numpy as np
from matplotlib.figure import Figure

from rskd_jax.eval import report as report_lib

# (column, dataset-key suffix or "divergence", metric key)
TASK_COLUMNS = (
    ("scene OA", "scene", "oa"),
    ("VQA mOA", "vqa", "moa"),
    ("grounding acc@0.5", "grounding", "acc@0.5"),
    ("caption ROUGE-L", "caption", "rougeL"),
    ("region caption ROUGE-L", "region_caption", "rougeL"),
)
KL_COLUMNS = (
    ("reverse KL, student samples", "divergence", "rkl_sampled"),
    ("reverse KL, reference", "divergence", "rkl_gt"),
    ("forward KL, reference", "divergence", "fkl_gt"),
)
COLUMNS = TASK_COLUMNS + KL_COLUMNS


def metric(result: dict, group: str, key: str):
    """One number of a run's result (None when that task was not evaluated)."""
    for name, m in result.items():
        if isinstance(m, dict) and (name == group or name.endswith("/" + group)):
            v = m.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return None


def summarise(results: list) -> dict:
    """{method: {column: {mean, std, values}}} over the seeds of each method (std: sample std, 0 for one)."""
    out = {}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    table = {}
    for method, runs in out.items():
        row = {}
        for col, group, key in COLUMNS:
            vals = [v for v in (metric(r, group, key) for r in runs) if v is not None]
            if vals:
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                row[col] = dict(mean=float(np.mean(vals)), std=std, values=vals)
        row["seeds"] = len(runs)
        table[method] = row
    return table


def _digits(group: str) -> int:
    return 4 if group == "divergence" else 1


def _cell(d, digits):
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" if d else "–"


def markdown(table: dict, starts: dict, columns=COLUMNS) -> str:
    cols = [c for c in columns if any(c[0] in row for row in table.values())]
    lines = [
        "| method | seeds | " + " | ".join(c[0] for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for name, res in starts.items():
        cells = []
        for _col, group, key in cols:
            v = metric(res, group, key)
            cells.append("–" if v is None else f"{v:.{_digits(group)}f}")
        lines.append(f"| {name} | – | " + " | ".join(cells) + " |")
    for method, row in table.items():
        cells = [_cell(row.get(col), _digits(group)) for col, group, _ in cols]
        lines.append(f"| {method} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curves(results: list, key: str) -> dict:
    """{method: (steps, mean over seeds)} of one KL curve."""
    by = {}
    for r in results:
        pts = [(p["step"], p[key]) for p in r.get("curve", []) if key in p]
        if pts:
            by.setdefault(r["method"], []).append(dict(pts))
    out = {}
    for method, curves in by.items():
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        out[method] = (steps, [float(np.mean([c[s] for c in curves])) for s in steps])
    return out


def figure(table: dict, results: list, path) -> pathlib.Path:
    """Bars with error bars per task (left), reverse / forward KL to the teacher over steps (right)."""
    tasks = [c for c in TASK_COLUMNS if any(c[0] in row for row in table.values())]
    methods = list(table)
    fig = Figure(figsize=(17, 5), dpi=100)
    ax = fig.add_subplot(1, 3, 1)
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        means = [table[m].get(c[0], {}).get("mean", np.nan) for c in tasks]
        stds = [table[m].get(c[0], {}).get("std", 0.0) for c in tasks]
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(np.arange(len(tasks)), [c[0] for c in tasks], rotation=20, fontsize=8)
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title("task metrics")
    ax.legend(fontsize=6, ncol=2)
    for j, (key, title) in enumerate(
        (
            ("rkl_sampled", "reverse KL to the teacher, student samples"),
            ("fkl_gt", "forward KL, reference answers"),
        )
    ):
        ax = fig.add_subplot(1, 3, 2 + j)
        for m, (steps, ys) in mean_curves(results, key).items():
            ax.plot(steps, ys, marker=".", label=m)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token (mean over seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    return path


def kl_records(results: list):
    """Evaluation records of the KL columns (from the runs, not the current config)."""
    n = {r["divergence"]["n_examples"] for r in results if "n_examples" in r.get("divergence", {})}
    return "/".join(str(x) for x in sorted(n)) or "–"


def write(workdir, results: list, starts: dict, *, config=None, wall_s: float | None = None) -> str:
    workdir = pathlib.Path(workdir)
    table = summarise(results)
    md = markdown(table, starts)
    c = config
    head = [
        "# Controlled comparison of distillation methods (rs-synth evaluation split)",
        "",
        f"{datetime.date.today().isoformat()}, {platform.node() or 'host'}, "
        + (f"{wall_s / 60:.1f} min" if wall_s else ""),
    ]
    if c is not None:
        head += [
            "",
            f"{int(c.total_steps)} steps per method, {int(c.compare.seeds)} seeds, batch {c.data.batch_size}, "
            f"evaluation: {c.compare.eval_limit or 'all'} records of the eval split, KL on "
            f"{kl_records(results)} records.",
        ]
    md = "\n".join(head) + "\n\n" + md + "\n\n![comparison](compare.png)\n"
    (workdir / "compare.md").write_text(md)
    report_lib.write_json(
        dict(
            table=table,
            starts={k: {kk: v for kk, v in s.items() if kk != "history"} for k, s in starts.items()},
            runs=[{k: v for k, v in r.items() if k != "history"} for r in results],
            wall_s=wall_s,
        ),
        workdir / "compare.json",
    )
    if results:
        figure(table, results, workdir / "compare.png")
    return md
