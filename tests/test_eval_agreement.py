"""rskd_jax.eval.agreement: exact-match agreement of a student's answers with the teacher's, per task file."""

import json

import pytest

from rskd_jax.eval.agreement import agreement, agreement_table, teacher_agreement


def _write(d, stem, rows):
    p = d / "predictions" / f"{stem}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_agreement_counts_exact_answers_matched_by_id(tmp_path):
    t = _write(
        tmp_path / "t",
        "scene",
        [dict(id=i, prediction=p) for i, p in enumerate(["Farm", "road", "lake", "x"])],
    )
    # ids in another order, one extra record the teacher lacks, whitespace / case differences are not differences
    s = _write(
        tmp_path / "s",
        "scene",
        [
            dict(id=3, prediction="y"),
            dict(id=0, prediction=" farm "),
            dict(id=1, prediction="road"),
            dict(id=2, prediction="river"),
            dict(id=9, prediction="lake"),
        ],
    )
    assert agreement(t, s) == pytest.approx(50.0)  # ids 0 and 1 of 4


def test_rows_without_ids_match_by_position_and_no_overlap_is_none(tmp_path):
    t = _write(tmp_path / "t", "vqa", [dict(prediction="yes"), dict(prediction="no"), dict(prediction="no")])
    s = _write(tmp_path / "s", "vqa", [dict(prediction="yes"), dict(prediction="yes"), dict(prediction="no")])
    assert agreement(t, s) == pytest.approx(200 / 3)
    u = _write(tmp_path / "u", "vqa", [dict(id="a", prediction="yes")])
    v = _write(tmp_path / "v", "vqa", [dict(id="b", prediction="yes")])
    assert agreement(u, v) is None


def test_teacher_agreement_table(tmp_path):
    rows = [dict(id=i, prediction=str(i)) for i in range(4)]
    _write(tmp_path / "teacher", "scene", rows)
    _write(tmp_path / "teacher", "caption", rows)
    _write(tmp_path / "a", "scene", rows)  # all four agree
    _write(tmp_path / "a", "caption", [dict(r, prediction="-") if r["id"] else r for r in rows])  # 1 of 4
    _write(tmp_path / "b", "scene", [dict(r, prediction="-") for r in rows])  # none; no caption file
    out = teacher_agreement(tmp_path / "teacher", {"A": tmp_path / "a", "B": tmp_path / "b"})
    assert out == {"A": {"caption": 25.0, "scene": 100.0}, "B": {"scene": 0.0}}
    md = agreement_table(out)
    assert "| model | caption | scene |" in md and "| A | 25.0 | 100.0 |" in md and "| B | – | 0.0 |" in md
    assert agreement_table({"A": {}}) == ""


def test_a_damaged_predictions_file_names_the_file_and_line(tmp_path):
    t = _write(tmp_path / "t", "scene", [dict(id=0, prediction="a")])
    s = tmp_path / "s.jsonl"
    s.write_text('{"id": 0, "prediction": "a"}\n{"id": 1, "predi\n')
    with pytest.raises(ValueError, match=r"s\.jsonl: line 2 is not JSON"):
        agreement(t, s)
