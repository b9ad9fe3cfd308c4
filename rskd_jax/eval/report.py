"""Metrics JSON and Markdown tables in the paper's layout, for one model or several side by side.

``results`` is always ``{model_name: {dataset_name: metrics}}`` where each metrics dict comes from a scorer
in ``rskd_jax.eval.metrics`` (or ``flops.params_flops_metrics``) and carries its ``task``. One model gives
the per-benchmark report; several (e.g. teacher / student before / student after) give comparison tables
with one row per model and, with ``delta=(before, after)``, a row of differences. The same module serves
``launch/eval.py``, the training loop's periodic eval and the demo's final report.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

DASH = "–"


def to_jsonable(obj):
    """numpy arrays/scalars -> lists/Python numbers, NaN/inf -> None, tuples -> lists, keys -> str."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def write_json(obj, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")
    return path


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}f}"


def _table(
    header: Sequence[str],
    rows: Sequence[tuple[str, Sequence]],
    delta: tuple[str, str] | None,
    digits: int = 2,
) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    by_name = dict(rows)
    for name, vals in rows:
        lines.append("| " + " | ".join([name, *(_fmt(v, digits) for v in vals)]) + " |")
    if delta and delta[0] in by_name and delta[1] in by_name:
        d = [None if a is None or b is None else b - a for a, b in zip(by_name[delta[0]], by_name[delta[1]])]
        cells = [DASH if x is None else f"{x:+.{digits}f}" for x in d]
        lines.append("| " + " | ".join([f"Δ ({delta[1]} − {delta[0]})", *cells]) + " |")
    return "\n".join(lines)


def _datasets(results, task) -> list[str]:
    seen: list[str] = []
    for per_model in results.values():
        for ds, m in per_model.items():
            if isinstance(m, Mapping) and m.get("task") == task and ds not in seen:
                seen.append(ds)
    return seen


def _get(results, model, ds):
    m = results[model].get(ds)
    return m if isinstance(m, Mapping) else {}


def _scene(results, delta):
    dss = _datasets(results, "scene")
    if not dss:
        return []
    header = ["model", *[f"{d} {k}" for d in dss for k in ("OA", "AA")]]
    rows = [(name, [_get(results, name, d).get(k) for d in dss for k in ("oa", "aa")]) for name in results]
    return ["### Scene classification (accuracy %)", _table(header, rows, delta)]


def _vqa(results, delta):
    out = []
    for d in _datasets(results, "vqa"):
        ms = {n: _get(results, n, d) for n in results}
        present = set().union(*[m.get("per_type", {}).keys() for m in ms.values()])
        kept = [t for t in ("presence", "comparison", "rural_urban") if t in present]
        extra = sorted(present - set(kept))
        header = [
            "model",
            *[t.replace("_", "/") for t in kept],
            "mOA (pooled, paper)",
            "mean of types (not the paper's)",
            *[f"{t} (not in mOA)" for t in extra],
        ]
        rows = [
            (
                n,
                [
                    *[m.get("per_type", {}).get(t) for t in kept],
                    m.get("moa", m.get("moa_micro")),
                    m.get("moa_macro"),
                    *[m.get("per_type", {}).get(t) for t in extra],
                ],
            )
            for n, m in ms.items()
        ]
        note = (
            "mOA (pooled, paper) = correct / questions over the kept types: the headline, the seed paper's "
            "Table 5 convention (GeoChat's average accuracy); mean of types = mean of the per-type accuracies."
        )
        out += [f"### VQA: {d} (accuracy %)", _table(header, rows, delta), note]
    return out


def _grounding(results, delta):
    out = []
    for d in _datasets(results, "grounding"):
        ms = {n: _get(results, n, d) for n in results}
        accs = sorted(
            {k for m in ms.values() for k in m if k.startswith("acc@")}, key=lambda k: -float(k[4:])
        )
        header = ["model", *accs, "mean IoU (%)"]
        rows = [
            (n, [*[m.get(k) for k in accs], None if m.get("mean_iou") is None else 100 * m["mean_iou"]])
            for n, m in ms.items()
        ]
        out += [f"### Referring / grounding: {d} (accuracy %)", _table(header, rows, delta)]
        if accs:
            main = accs[0]
            cols = []
            for m in ms.values():
                for g, vals in m.get("by_group", {}).items():
                    for v in vals:
                        if (g, v) not in cols:
                            cols.append((g, v))
            if cols:
                header = ["model", *[f"{v}" for _, v in cols], "overall"]
                rows = [
                    (
                        n,
                        [
                            *[m.get("by_group", {}).get(g, {}).get(v, {}).get(main) for g, v in cols],
                            m.get(main),
                        ],
                    )
                    for n, m in ms.items()
                ]
                out += [
                    f"{d}: {main} by group ({', '.join(dict.fromkeys(g for g, _ in cols))})",
                    _table(header, rows, delta),
                ]
    return out


def _caption(results, delta):
    out = []
    for d in _datasets(results, "caption"):
        rows = [(n, [_get(results, n, d).get(k) for k in ("rouge1", "rougeL", "meteor")]) for n in results]
        header = ["model", "ROUGE-1", "ROUGE-L", "METEOR"]
        out += [f"### Region captioning: {d} (%)", _table(header, rows, delta)]
    return out


def _params(results, delta):
    out = []
    for d in _datasets(results, "params_flops"):
        keys = ("vision", "projector", "llm", "paper_total", "total")
        rows, seqs, texts = [], set(), set()
        for n in results:
            m = _get(results, n, d)
            p, f = m.get("params", {}), m.get("flops", {})
            if m:
                seqs.add(m.get("seq_len"))
                texts.add(m.get("paper_text_tokens"))
            rows.append(
                (
                    n,
                    [
                        *[None if k not in p else p[k] / 1e6 for k in keys],
                        None if m.get("paper_flops") is None else m["paper_flops"] / 1e9,
                        None if "total" not in f else f["total"] / 1e9,
                    ],
                )
            )
        header = [
            "model",
            "vision (M)",
            "projector (M)",
            "LLM (M)",
            "params (M, paper)",
            "total (M)",
            "GFLOPs (paper)",
            "GFLOPs (full)",
        ]
        join = lambda xs: ", ".join(str(x) for x in sorted(xs, key=str))
        note = (
            f"GFLOPs (paper): the seed paper's Table 8 convention, an LLM-only forward over {join(texts)} text "
            "tokens (LM head at every position). GFLOPs (full): one multimodal forward (CLIP + projector + LLM) "
            f"at sequence length {join(seqs)} (image tokens included). Both count matmul FLOPs only "
            "(2·m·n·k). params (M, paper) = LLM + projector + CLIP position table."
        )
        out += [f"### Parameters and FLOPs: {d}", _table(header, rows, delta), note]
    return out


def markdown_report(
    results: Mapping[str, Mapping[str, dict]], title: str | None = None, delta: tuple[str, str] | None = None
) -> str:
    """Markdown tables (one per task / dataset), rows = models in the given order; ``delta=(a, b)`` adds a
    row b − a (e.g. ("student (before)", "student (after)"))."""
    parts = [f"## {title}"] if title else []
    for section in (_scene, _vqa, _grounding, _caption, _params):
        parts += section(results, delta)
    return "\n\n".join(parts) + "\n"


def write_report(
    results: Mapping[str, Mapping[str, dict]],
    out_dir,
    name: str = "metrics",
    title: str | None = None,
    delta: tuple[str, str] | None = None,
) -> dict[str, pathlib.Path]:
    """Write ``{name}.json`` (all metrics, numpy converted) and ``{name}.md`` (tables) into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text(markdown_report(results, title=title, delta=delta))
    return dict(json=write_json(results, out_dir / f"{name}.json"), markdown=md)
