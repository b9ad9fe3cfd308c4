"""Batch prediction: greedy answers for many images, written as the evaluation runner's prediction rows.

Inputs (`read_input`):
* a folder of images + one question: every image below it (sorted), ids = relative paths;
* a folder of class folders without a question (UC Merced, AID): GeoChat's scene-classification prompt, the
  class as reference (`SceneFolderSource`), so the output can be scored;
* a JSONL / JSON list of `{image, question}` rows (optional `id`, `answer`, `task`); images relative to the
  file's folder or `image_root`;
* a GeoChat-Bench file (scene, VQA, referring, region captions; `GeoChatBenchSource`) or a captions JSONL.

`predict` runs the evaluation's `ExampleTransform` (llava_v1) and `Generator` (the compiled greedy loop,
one compile per prompt-width bucket) in batches and appends one row per record to the output JSONL (flushed
after every batch): `runner.prediction_row` (id, task, question, prediction, reference, meta) + `image`, or
`error` for a record whose image is missing or corrupt. A rerun keeps the answered rows, skips their ids, and
retries the failed ones. `score_file` (runner.py, re-exported here) scores such a file (or the runner's
`predictions/*.jsonl`) with the runner's task scorers: `launch/eval.py --config.predictions=FILE`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from rskd_jax.data import CaptionSource, ExampleTransform, GeoChatBenchSource, SceneFolderSource
from rskd_jax.data.errors import BadRecords, DataError
from rskd_jax.data.sources import IMAGE_EXTS, human_gpt, infer_task, read_json_records
from rskd_jax.eval.generate import Generator, load_tokenizer_any
from rskd_jax.eval.report import to_jsonable
from rskd_jax.eval.runner import prediction_row, score_file  # noqa: F401  (score_file: scoring this output)

log = logging.getLogger("rskd_jax.eval")


# ------------------------------------------------------------------------------------------------ inputs


def _first_row(path: pathlib.Path) -> dict:
    rows = read_json_records(path, BadRecords(False, str(path)))
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"{path}: expected JSON objects, one per record")
    return rows[0]


def _question_rows(path: pathlib.Path, root: pathlib.Path, question: str | None) -> list[dict]:
    out = []
    for k, r in enumerate(read_json_records(path, BadRecords(False, str(path)))):
        q = r.get("question", question) if isinstance(r, dict) else None
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(q, str):
            raise DataError(f"{path}:{k + 1}: expected {{'image': str, 'question': str}} (or --question)")
        answer = r.get("answer")
        out.append(
            {
                "id": str(r.get("id", k)),
                "image": str(root / r["image"]),
                "conversations": human_gpt(q, answer if isinstance(answer, str) else None),
                "task": r.get("task") or infer_task(q),
                "meta": {"answer": answer} if answer is not None else {},
            }
        )
    return out


def read_input(path, question: str | None = None, image_root=None) -> list[dict]:
    """Records (`id`, `image`, `conversations`, `task`, `meta`) of a prediction input (see the module doc)."""
    path = pathlib.Path(path)
    if path.is_dir():
        if question is None:
            return SceneFolderSource(path).records
        files = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"{path}: no image files ({', '.join(IMAGE_EXTS)})")
        return [
            {
                "id": str(f.relative_to(path)),
                "image": str(f),
                "conversations": human_gpt(question, None),
                "task": infer_task(question),
                "meta": {},
            }
            for f in files
        ]
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a folder of images, a .jsonl or a .json file")
    root = pathlib.Path(image_root) if image_root else path.parent
    first = _first_row(path)
    if "captions" in first:
        return CaptionSource(path, root).records
    if "question_id" in first or "image_id" in first:
        return GeoChatBenchSource(path, root).records
    return _question_rows(path, root, question)


# -------------------------------------------------------------------------------------------- prediction


def read_done(out: pathlib.Path) -> dict[str, dict]:
    """Answered rows of an earlier run by id. The file is rewritten without its error rows and any cut-off
    last line (a run killed mid-write), so the rerun's rows follow the kept ones."""
    if not out.exists():
        return {}
    done, lines = {}, out.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # cut off by an interrupted write
            raise DataError(f"{out}:{n}: not a JSON line; is this a predictions file?") from None
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{out}:{n}: row without an 'id'; is this a predictions file?")
        if "error" not in row:
            done[str(row["id"])] = row
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
    os.replace(tmp, out)
    return done


def predict(
    model,
    tokenizer,
    records: Sequence[dict],
    out,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_prompt_len: int | None = None,
    template: str = "llava_v1",
    progress: bool = True,
) -> dict[str, int]:
    """Answers every record not yet in `out` (JSONL, appended per batch) -> counts
    {answered, skipped (already done), failed (error rows), total}."""
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"input has duplicate ids (e.g. {dup!r}); ids must be unique to resume")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [r for r in records if str(r["id"]) not in done]
    tok = load_tokenizer_any(tokenizer)
    cfg = model.cfg
    max_prompt_len = max_prompt_len or cfg.image_seq_length + 256
    transform = ExampleTransform(
        tok,
        image_size=cfg.vision.image_size,
        image_seq_length=cfg.image_seq_length,
        max_len=max_prompt_len + max_new_tokens,
        max_prompt_len=max_prompt_len,
        template=template,
    )
    gen = Generator(model, tok, max_new_tokens, batch_size)
    counts = dict(answered=0, skipped=len(records) - len(todo), failed=0, total=len(records))
    with (
        out.open("a", encoding="utf-8") as f,
        tqdm(
            total=len(records), initial=counts["skipped"], desc="predict", unit="img", disable=not progress
        ) as bar,
    ):
        for s in range(0, len(todo), batch_size):
            rows, examples, ok = [], [], []
            for r in todo[s : s + batch_size]:
                try:
                    examples.append(transform(r))
                    ok.append(r)
                except DataError as e:
                    rows.append(dict(prediction_row(None, r), image=str(r["image"]), error=str(e)))
                    counts["failed"] += 1
            if examples:
                batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
                for text, r in zip(gen(batch), ok):
                    rows.append(dict(prediction_row(text, r), image=str(r["image"])))
                    counts["answered"] += 1
            f.write("".join(json.dumps(to_jsonable(row)) + "\n" for row in rows))
            f.flush()
            bar.update(len(rows))
    return counts


# --------------------------------------------------------------------------------------------- scoring
