"""Agreement with the teacher: how often a student's answer is exactly the teacher's, per task file.

Task metrics say how good a student is; they do not say whether distillation made it answer *like the teacher*
(the thing it is trained for), which matters where the teacher itself is wrong: a student that copies a wrong
teacher scores low on the task and high here. Both sides are the `predictions/*.jsonl` files that
`runner.evaluate` writes (one row per record: id, task, prediction, reference); rows are matched by `id` (by
position where a file has no ids) and answers compared after collapsing whitespace and case.
"""

from __future__ import annotations

import json
import pathlib

from rskd_jax.data.errors import DataError


def _norm(text) -> str:
    return " ".join(str(text or "").split()).lower()


def _rows(path: pathlib.Path) -> dict:
    """{id (or row index): normalised prediction} of one predictions JSONL."""
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {i + 1} is not JSON ({e.msg}); expected a predictions row"
            ) from None
        key = row.get("id")
        out[i if key is None else key] = _norm(row.get("prediction"))
    return out


def agreement(teacher_file, student_file) -> float | None:
    """Percentage of the records of `teacher_file` that `student_file` answers exactly as the teacher did
    (None when the two files share no record)."""
    t, s = _rows(pathlib.Path(teacher_file)), _rows(pathlib.Path(student_file))
    common = [k for k in t if k in s]
    if not common:
        return None
    return 100.0 * sum(t[k] == s[k] for k in common) / len(common)


def teacher_agreement(teacher_dir, students: dict) -> dict:
    """{student name: {file stem: % agreement}} for every predictions/*.jsonl of `teacher_dir` that a student's
    directory also has (`teacher_dir` and each value of `students`: an `evaluate` out_dir)."""
    tdir = pathlib.Path(teacher_dir) / "predictions"
    files = sorted(tdir.glob("*.jsonl")) if tdir.is_dir() else []
    out = {}
    for name, sdir in students.items():
        row = {}
        for f in files:
            other = pathlib.Path(sdir) / "predictions" / f.name
            if other.exists():
                value = agreement(f, other)
                if value is not None:
                    row[f.stem] = value
        out[name] = row
    return out


def agreement_table(agree: dict) -> str:
    """Markdown: one row per student, one column per task file (the stems of `teacher_agreement`)."""
    cols = sorted({k for row in agree.values() for k in row})
    if not cols:
        return ""
    lines = [
        "### Agreement with the teacher (% of evaluation records answered exactly as the teacher did)",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, row in agree.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if c in row else "–" for c in cols) + " |")
    lines.append("")
    lines.append(
        "Exact match of the generated answers after collapsing whitespace and case. High agreement with a low "
        "task score means the student learned the teacher's mistakes."
    )
    return "\n".join(lines)
