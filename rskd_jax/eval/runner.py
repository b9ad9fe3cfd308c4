"""Task evaluation over datasets: generate answers with a model, score them per task, write reports.

`evaluate(model, tokenizer, {name: source}, Generation(...), Scoring(...))` runs greedy generation
(`generate.Generator`) over every record whose task is asked for, then dispatches per record `task`:

    scene                 -> metrics.scene_scores (classes of the source) + confusion-matrix PNG
    vqa                   -> metrics.vqa_scores (per type, mOA pooled and mean of types)
    refer, grounding      -> metrics.grounding_scores (acc@0.5 / @0.25, by type and size) + boxes PNG
    region_caption        -> metrics.caption_scores (ROUGE-1/L, METEOR optional)
    caption               -> metrics.caption_scores (image captions, e.g. UCM-captions)

A source holding several of these (rs-synth) is split: its results are keyed `"{name}/{group}"`; a source
with one group keeps its own name. `Generation.limit` picks that many records spread evenly over the eligible
ones (so a class-sorted folder source keeps every class), deterministically. `run_eval(config)` is the whole
`launch/eval.py` (model + tokenizer + datasets from a configs/eval.py config, reports into `out_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rskd_jax.data import (
    CaptionSource,
    ExampleTransform,
    GeoChatBenchSource,
    RSVQASource,
    SceneFolderSource,
    SynthSource,
    eval_batches,
)
from rskd_jax.data.errors import DataError
from rskd_jax.data.sources import human_gpt
from rskd_jax.data.synth import train_synth_tokenizer
from rskd_jax.data.tokenizer import special_ids
from rskd_jax.eval import flops, metrics, plots, report
from rskd_jax.eval.generate import Generator, load_tokenizer_any
from rskd_jax.eval.lengths import choose_lengths
from rskd_jax.eval.report import markdown_report, to_jsonable, write_report
from rskd_jax.models import LlavaModel, get_preset
from rskd_jax.pretrained import load_pretrained

log = logging.getLogger("rskd_jax.eval")

# Record task -> scored group; `tasks` may name groups or record tasks ("grounding" selects refer + grounding,
# "caption" selects region_caption + caption).
TASK_GROUP = {
    "scene": "scene",
    "vqa": "vqa",
    "refer": "grounding",
    "grounding": "grounding",
    "region_caption": "region_caption",
    "caption": "caption",
}
SELECTORS = {
    "scene": {"scene"},
    "vqa": {"vqa"},
    "grounding": {"refer", "grounding"},
    "refer": {"refer"},
    "region_caption": {"region_caption"},
    "caption": {"region_caption", "caption"},
}
ALL_TASKS = ("scene", "vqa", "grounding", "caption")


# ----------------------------------------------------------------------------------------------- selection


class Subset:
    """A random-access view of `source` at `indices` (what the Grain pipeline reads)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]
        self.name = getattr(source, "name", type(source).__name__)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return self.source[self.indices[int(k)]]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, n={len(self)})"


def record_task(source, index: int) -> str:
    """The `task` of record `index` without decoding its image when the source allows it."""
    if hasattr(source, "records"):
        return source.records[index].get("task", "")
    if hasattr(source, "sample"):  # SynthSource: the record without rendering its image
        return source.sample(index)[0]["task"]
    return source[index].get("task", "")


def spread(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when limit is None/0 or >= n)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, int(limit)).round()})


def select(source, tasks: Sequence[str], limit: int | None) -> list[int]:
    """Indices of the records of `source` whose task is selected by `tasks`, thinned to `limit` (`spread`)."""
    unknown = [t for t in tasks if t not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; known: {sorted(SELECTORS)}")
    wanted = set().union(*(SELECTORS[t] for t in tasks))
    eligible = [i for i in range(len(source)) if record_task(source, i) in wanted]
    return [eligible[k] for k in spread(len(eligible), limit)]


# ------------------------------------------------------------------------------------------------- scoring


def _answer(record: dict) -> str | None:
    conv = record.get("conversations") or []
    return conv[1]["value"] if len(conv) > 1 else None


def _question(record: dict) -> str:
    conv = record.get("conversations") or [{"value": ""}]
    return conv[0]["value"].replace("<image>", "").strip()


def scene_classes(source, records: Sequence[dict]) -> list[str]:
    """Class names of a scene source: `class_names` (folders), `meta.classes`, or the prompt's class list."""
    if getattr(source, "class_names", None):
        return list(source.class_names)
    m = records[0].get("meta", {})
    if m.get("classes"):
        return list(m["classes"])
    found = re.search(r"Classes:\s*(.*?)\s*\.\s*(?:\n|$)", _question(records[0]), re.S)
    if not found:
        raise ValueError(
            f"{getattr(source, 'name', source)}: cannot find the class list of the scene records "
            "(no source.class_names, meta.classes or 'Classes: ...' in the prompt)"
        )
    return [c.strip() for c in found.group(1).split(",") if c.strip()]


def _scene_gt(record: dict):
    m = record.get("meta", {})
    if isinstance(m.get("label"), (int, np.integer)) and (m.get("classes") or "class_name" in m):
        return int(m["label"])
    for key in ("ground_truth", "class_name", "class", "scene"):
        if m.get(key) is not None:
            return m[key]
    if _answer(record) is not None:
        return _answer(record)
    raise ValueError(f"scene record {record.get('id')}: no ground truth (meta.label/ground_truth/class)")


def _grounding_gt(record: dict) -> list:
    m = record.get("meta", {})
    if "targets" in m and "objects" in m:  # rs-synth: rotated boxes on the 0-100 grid
        return [[*m["objects"][i]["box"], m["objects"][i]["angle"]] for i in m["targets"]]
    if m.get("ground_truth"):  # GeoChat-Bench referring: 4-point polygons (assumed on the 0-100 grid)
        return list(m["ground_truth"])
    if m.get("boxes"):
        return list(m["boxes"])
    raise ValueError(
        f"grounding record {record.get('id')}: no ground-truth boxes (meta.objects/ground_truth)"
    )


def _caption_refs(record: dict) -> list[str]:
    m = record.get("meta", {})
    if m.get("captions"):
        return list(m["captions"])
    for ref in (m.get("ground_truth"), m.get("answer"), _answer(record)):
        if isinstance(ref, str) and ref.strip():
            return [ref]
    raise ValueError(f"caption record {record.get('id')}: no reference caption (meta.captions/answer)")


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_")


def score(
    group: str,
    preds: Sequence[str],
    records: Sequence[dict],
    source,
    *,
    meteor: bool = True,
    strict: bool = False,
    rotated: bool = True,
    figure_dir: pathlib.Path | None = None,
    key: str = "",
    num_plot: int = 8,
) -> dict:
    """Metrics of one task group (see the module doc); writes its PNG into `figure_dir` when given."""

    stem = _file_stem(key or group)
    if group == "scene":
        classes = scene_classes(source, records)
        out = metrics.scene_scores(preds, [_scene_gt(r) for r in records], classes, strict=strict)
        if figure_dir is not None:
            out["figure"] = str(
                plots.plot_confusion(
                    out["confusion"], out["classes"], figure_dir / f"{stem}_confusion.png", title=key
                )
            )
        return out
    if group == "vqa":
        answers = [r.get("meta", {}).get("answer") for r in records]
        if any(a is None for a in answers):
            raise ValueError(
                f"{key}: VQA records without answers (GeoChat-Bench VQA needs its answers joined "
                "from the RSVQA files: GeoChatBenchSource(..., answers=...))"
            )
        return metrics.vqa_scores(preds, answers, [r["meta"].get("type") for r in records], strict=strict)
    if group == "grounding":
        gts = [_grounding_gt(r) for r in records]
        groups = {"type": [r.get("task") for r in records]}
        sizes = [r.get("meta", {}).get("size_group") for r in records]
        if all(s is not None for s in sizes):
            groups["size"] = sizes
        out = metrics.grounding_scores(preds, gts, rotated=rotated, groups=groups)
        if figure_dir is not None and records:
            shown = [
                dict(image=r["image"], pred=p, gt=g, title=f"{r.get('id')}: {p[:40]}")
                for r, p, g in list(zip(records, preds, gts))[:num_plot]
            ]
            out["figure"] = str(plots.plot_grounding(shown, figure_dir / f"{stem}_boxes.png"))
        return out
    if group in ("region_caption", "caption"):
        out = metrics.caption_scores(preds, [_caption_refs(r) for r in records], meteor=meteor)
        out["kind"] = group
        return out
    raise ValueError(f"no scorer for task group {group!r}")


# ---------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `evaluate` generates and how: the records (`tasks`, at most `limit` per source, spread evenly, see
    `select`), the batch, the answer length and the model input.

    image_size: model input size (default: the model's `cfg.vision.image_size`). max_prompt_len: prompt width;
    max_len: width of the training-style `input_ids` the transform also builds; unset, both are sized from the
    records' own text (`rskd_jax.eval.lengths`). generator: batch -> texts, replacing greedy generation with
    the model (tests, or a sharded generator; then the model may be None if image_size and image_seq_length
    are given).
    """

    tasks: Sequence[str] = ALL_TASKS
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 64
    image_size: int | None = None
    image_seq_length: int | None = None
    max_len: int | None = None
    max_prompt_len: int | None = None
    template: str = "llava_v1"
    pad_to_square: bool = True
    skip_bad_records: bool = False
    generator: Callable[[dict], list[str]] | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How `evaluate` scores and reports. out_dir: writes `{out_dir}/metrics.{json,md}` (model row
    `model_name`), `predictions/{key}.jsonl` (id, task, prediction, reference) and the PNGs (at most `num_plot`
    examples each). `meteor=False` skips METEOR (it needs Java and takes seconds to start); `strict` and
    `rotated` as in `score`."""

    out_dir: str | pathlib.Path | None = None
    model_name: str = "model"
    meteor: bool = True
    strict: bool = False
    rotated: bool = True
    num_plot: int = 8


def evaluate(
    model,
    tokenizer_dir,
    sources: Mapping[str, Any],
    generation: Generation = Generation(),
    scoring: Scoring = Scoring(),
) -> dict[str, dict]:
    """Generate (`generation`) and score (`scoring`) every selected record of every source -> {dataset key:
    metrics}. tokenizer_dir: tokenizer directory or loaded tokenizer."""
    g = generation
    tok = load_tokenizer_any(tokenizer_dir)
    transform = _transform(model, tok, sources, g)
    gen = g.generator or Generator(model, tok, g.max_new_tokens, g.batch_size)
    out_dir = None if scoring.out_dir is None else pathlib.Path(scoring.out_dir)
    results: dict[str, dict] = {}
    for name, source in sources.items():
        idx = select(source, g.tasks, g.limit)
        if not idx:
            log.warning("%s: no records for tasks %s; skipped", name, list(g.tasks))
            continue
        sub = Subset(source, idx)
        preds, records = [], []
        t0 = time.perf_counter()
        with tqdm(total=len(sub), desc=f"eval {name}", unit="ex", disable=not g.progress) as bar:
            for batch, recs in eval_batches(
                sub, transform, g.batch_size, skip_bad_records=g.skip_bad_records
            ):
                texts = gen(batch)
                preds += list(texts[: len(recs)])
                records += recs
                bar.update(len(recs))
        seconds = time.perf_counter() - t0
        results.update(_score_source(name, source, preds, records, seconds, scoring, out_dir))
        log.info("%s: %d examples in %.1f s", name, len(records), seconds)
    if out_dir is not None:
        write_report({scoring.model_name: results}, out_dir, title=f"Evaluation: {scoring.model_name}")
    return results


def _transform(model, tok, sources: Mapping[str, Any], g: Generation) -> ExampleTransform:
    """The records -> model inputs transform, its widths sized from the selected records unless given."""
    cfg = model.cfg if model is not None else None
    if cfg is None and (g.generator is None or not g.image_size or not g.image_seq_length):
        raise ValueError("evaluate: model=None needs a generator, image_size and image_seq_length")
    image_size = g.image_size or cfg.vision.image_size
    image_seq_length = g.image_seq_length or cfg.image_seq_length
    max_prompt_len, max_len = choose_lengths(
        tok,
        [Subset(s, select(s, g.tasks, g.limit)) for s in sources.values()],
        image_seq_length=image_seq_length,
        template=g.template,
        max_new_tokens=g.max_new_tokens,
        max_prompt_len=g.max_prompt_len,
        max_len=g.max_len,
    )
    return ExampleTransform(
        tok,
        image_size=image_size,
        image_seq_length=image_seq_length,
        max_len=max_len,
        max_prompt_len=max_prompt_len,
        template=g.template,
        pad_to_square=g.pad_to_square,
    )


def _score_source(name, source, preds, records, seconds, scoring: Scoring, out_dir) -> dict[str, dict]:
    """{key: metrics} of one source's predictions, one entry per task group (`name/group` when several)."""
    by_group: dict[str, list[int]] = {}
    for k, r in enumerate(records):
        by_group.setdefault(TASK_GROUP[r["task"]], []).append(k)
    results = {}
    for group, ks in by_group.items():
        key = name if len(by_group) == 1 else f"{name}/{group}"
        p, rs = [preds[k] for k in ks], [records[k] for k in ks]
        m = score(
            group,
            p,
            rs,
            source,
            meteor=scoring.meteor,
            strict=scoring.strict,
            rotated=scoring.rotated,
            figure_dir=out_dir,
            key=key,
            num_plot=scoring.num_plot,
        )
        m.update(dataset=name, generation_seconds=seconds * len(ks) / len(records))
        results[key] = m
        if out_dir is not None:
            _write_predictions(out_dir / "predictions" / f"{_file_stem(key)}.jsonl", p, rs)
    return results


def _write_predictions(path: pathlib.Path, preds: Sequence[str], records: Sequence[dict]) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p, r in zip(preds, records):
            f.write(json.dumps(to_jsonable(prediction_row(p, r))) + "\n")


def prediction_row(prediction: str | None, record: dict) -> dict:
    """One predictions/*.jsonl row (also what launch/predict.py writes and `predict.score_file` scores)."""
    return dict(
        id=record.get("id"),
        task=record.get("task"),
        question=_question(record),
        prediction=prediction,
        reference=_answer(record),
        meta={k: v for k, v in record.get("meta", {}).items() if k != "classes"},
    )


# ------------------------------------------------------------------------------------- models and datasets


def score_file(path, out_dir=None, *, meteor: bool = False, strict: bool = False, rotated: bool = True):
    """Task metrics of a predictions JSONL (`predict.predict`'s output or `predictions/*.jsonl` of `evaluate`):
    rows grouped by task and scored like `evaluate` does; error rows and rows whose task has no
    scorer are counted, not scored. Writes metrics.{json,md} into `out_dir` when given."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    groups: dict[str, list[dict]] = {}
    skipped: dict[str, int] = {}
    for r in rows:
        why = "error" if "error" in r else None if r.get("task") in TASK_GROUP else "no scorer"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            groups.setdefault(TASK_GROUP[r["task"]], []).append(r)
    if not groups:
        raise DataError(f"{path}: no scorable rows ({skipped or 'empty file'}); tasks: {list(TASK_GROUP)}")
    results: dict[str, Any] = {}
    for group, rs in groups.items():
        key = path.stem if len(groups) == 1 else f"{path.stem}/{group}"
        records = [
            dict(
                id=r["id"],
                task=r["task"],
                image=r.get("image"),
                meta=r.get("meta") or {},
                conversations=human_gpt(r.get("question", ""), r.get("reference")),
            )
            for r in rs
        ]
        preds = [r["prediction"] for r in rs]
        fig = None if out_dir is None else pathlib.Path(out_dir)
        if group == "grounding" and any(not rec["image"] for rec in records):
            fig = None  # the boxes figure needs the images
        m = score(
            group,
            preds,
            records,
            None,
            meteor=meteor,
            strict=strict,
            rotated=rotated,
            figure_dir=fig,
            key=key,
        )
        m.update(dataset=path.stem, not_scored=skipped)
        results[key] = m
    if out_dir is not None:
        write_report({path.stem: results}, pathlib.Path(out_dir), title=f"Scores: {path.name}")
    print(markdown_report({path.stem: results}))
    if skipped:
        print(f"not scored: {skipped}")
    return results


def load_model(checkpoint, dtype: str | None = None, **overrides):
    """An LlavaModel from our converted checkpoint or any directory the converter reads (transformers Llava,
    original LLaVA / GeoChat), via `rskd_jax.load_pretrained`; `dtype` = parameter and compute dtype (None: as
    stored); `overrides`: other LlavaConfig fields."""

    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"config.checkpoint={path} does not exist")
    model, _ = load_pretrained(path, dtype=dtype or None, **overrides)
    return model


def random_model(cfg, seed: int = 0):
    """A random LlavaModel for smoke runs without a checkpoint: weights N(0, 0.02), norm scales 1, biases 0.

    Filled from NumPy into an abstract model: eager nnx init dispatches (and compiles) one small XLA program
    per parameter, which takes seconds even for the tiny preset.
    """

    model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name = str(path[-1])
        if name == "scale":
            value = np.ones(var.shape)
        elif name == "bias":
            value = np.zeros(var.shape)
        else:
            value = rng.normal(0.0, 0.02, var.shape)
        var.set_value(jax.numpy.asarray(value, var.dtype))
    nnx.update(model, state)
    return model


def _peek_jsonl(path: pathlib.Path) -> dict:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    raise ValueError(f"{path}: empty jsonl file")


def _need(path: str, what: str) -> pathlib.Path:
    if not path:
        raise ValueError(f"config.data_dir is empty: set it to {what}")
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config.data_dir={p} does not exist ({what})")
    return p


def task_sources(task: str, data_dir: str, c) -> dict[str, Any]:
    """Sources for one task preset from `data_dir` (a folder or a jsonl file; see configs/eval.py)."""

    image_root = c.get("image_root", "") or None
    skip = bool(c.get("skip_bad_records", False))
    if task == "scene":
        p = _need(
            data_dir, "a folder of class folders (UCMerced_LandUse/Images, AID) or a GeoChat-Bench jsonl"
        )
        if p.suffix == ".jsonl":
            return {
                p.stem: GeoChatBenchSource(p, image_root or p.parent, kind="scene", skip_bad_records=skip)
            }
        s = SceneFolderSource(p, skip_bad_records=skip)
        return {s.name: s}
    if task == "vqa":
        p = _need(data_dir, "an RSVQA folder ({prefix}_split_{split}_*.json) or a GeoChat-Bench jsonl")
        if p.suffix == ".jsonl":
            if not c.get("rsvqa_dir"):
                raise ValueError(
                    "GeoChat-Bench VQA jsonl has no answers: set config.rsvqa_dir to the RSVQA folder"
                )
            ref = RSVQASource(c.rsvqa_dir, c.vqa_split, prefix=c.rsvqa_prefix, exclude_types=())
            answers = {r["meta"]["question_id"]: r["meta"]["answer"] for r in ref.records}
            return {
                p.stem: GeoChatBenchSource(
                    p, image_root or p.parent, kind="vqa", answers=answers, skip_bad_records=skip
                )
            }
        s = RSVQASource(p, c.vqa_split, prefix=c.rsvqa_prefix, skip_bad_records=skip)
        return {s.name: s}
    if task == "grounding":
        p = _need(data_dir, "GeoChat-Bench referring.jsonl")
        return {
            p.stem: GeoChatBenchSource(p, image_root or p.parent, kind="referring", skip_bad_records=skip)
        }
    if task == "caption":
        p = _need(data_dir, "GeoChat-Bench region_captioning.jsonl or a captions jsonl (ucm_captions.jsonl)")
        if "captions" in _peek_jsonl(p):
            root = image_root or p.parent / "UCMerced_LandUse" / "Images"
            return {p.stem: CaptionSource(p, root, skip_bad_records=skip)}
        return {
            p.stem: GeoChatBenchSource(
                p, image_root or p.parent, kind="region_caption", skip_bad_records=skip
            )
        }
    raise ValueError(f"unknown task preset {task!r}")


# Standard names looked for under data_dir by the `all` preset: (relative path, task, extra config).
ALL_LAYOUT = (
    ("UCMerced_LandUse", "scene", {}),
    ("AID", "scene", {}),
    ("RSVQA_LR", "vqa", dict(rsvqa_prefix="LR", vqa_split="test")),
    ("RSVQA_HR", "vqa", dict(rsvqa_prefix="USGS", vqa_split="test_phili")),
    ("referring.jsonl", "grounding", {}),
    ("region_captioning.jsonl", "caption", {}),
    ("ucm_captions.jsonl", "caption", {}),
)


def build_sources(c) -> dict[str, Any]:
    """{name: source} for a configs/eval.py config (`c.preset` = task, `all` or `synth`)."""
    if c.preset == "synth":
        return {
            "rs_synth": SynthSource(c.synth_size, image_size=c.synth_image_size, seed=c.seed, split="test")
        }
    if c.preset != "all":
        return task_sources(c.preset, c.data_dir, c)
    root = _need(c.data_dir, "a folder holding the datasets under their standard names")
    out: dict[str, Any] = {}
    for rel, task, extra in ALL_LAYOUT:
        if task in c.tasks and (root / rel).exists():
            sub = dict(c.to_dict() if hasattr(c, "to_dict") else c, **extra)
            out.update(task_sources(task, str(root / rel), _Cfg(sub)))
    if not out:
        raise FileNotFoundError(
            f"{root}: none of {[r for r, _, _ in ALL_LAYOUT]} found for tasks {list(c.tasks)}"
        )
    return out


class _Cfg(dict):
    """dict with attribute access (a config copy with a few keys replaced)."""

    __getattr__ = dict.__getitem__


def run_eval(c) -> dict:
    """The whole `launch/eval.py`: params table, or model + tokenizer + datasets -> metrics and reports."""

    out_dir = pathlib.Path(c.out_dir or f"runs/eval/{c.preset}")
    if c.get("predictions"):  # score a predictions file (launch/predict.py output): no model
        return score_file(c.predictions, out_dir, meteor=c.meteor, strict=c.strict, rotated=c.rotated)
    if c.preset == "params":
        return params_report(
            c.models,
            out_dir,
            seq_len=c.get("seq_len") or None,
            paper_text_tokens=c.get("paper_text_tokens", 512),
        )
    sources = build_sources(c)  # bad data is reported before a model is loaded
    tok_dir = c.tokenizer or c.checkpoint
    if not tok_dir and c.preset == "synth":
        tok_dir = out_dir / "tokenizer"
        if not (tok_dir / "tokenizer_config.json").is_file():
            log.info("training an rs-synth tokenizer into %s", tok_dir)
            train_synth_tokenizer(tok_dir)
    if not tok_dir:
        raise ValueError("set config.tokenizer (or config.checkpoint, a directory holding the tokenizer)")

    tok = load_tokenizer_any(str(tok_dir))
    if c.checkpoint:
        model = load_model(c.checkpoint, dtype=c.dtype or None)
    else:
        if c.preset != "synth":
            raise ValueError("config.checkpoint is empty (only the synth preset runs a random model)")
        overrides = dict(dtype=c.dtype) if c.dtype else {}
        model = random_model(smoke_config(c.model, tok, c.image_size, **overrides), c.seed)
        log.warning("no checkpoint: evaluating a RANDOMLY initialised %r model (smoke run)", c.model)
    name = c.model_name or pathlib.Path(c.checkpoint or c.model).name
    generation = Generation(
        tasks=tuple(c.tasks),
        limit=c.limit or None,
        batch_size=c.batch_size,
        max_new_tokens=c.max_new_tokens,
        image_size=c.image_size or None,
        max_len=c.max_len or None,
        max_prompt_len=c.max_prompt_len or None,
        progress=c.progress,
    )
    scoring = Scoring(out_dir=out_dir, model_name=name, meteor=c.meteor, strict=c.strict, rotated=c.rotated)
    results = evaluate(model, tok, sources, generation, scoring)
    print(report.markdown_report({name: results}))
    print(f"metrics, predictions and figures in {out_dir}")
    return results


def smoke_config(preset: str, tok, image_size: int | None = None, **overrides):
    """Preset config resized to a tokenizer (vocab, special ids) and an image size: the random smoke model."""

    ids = special_ids(tok)
    cfg = get_preset(preset, **overrides)
    vision = cfg.vision if not image_size else dataclasses.replace(cfg.vision, image_size=image_size)
    return cfg.replace(
        vision=vision,
        text=dataclasses.replace(cfg.text, vocab_size=ids.vocab_size),
        image_token_id=ids.image,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )


def params_report(
    models: Sequence[str] | str, out_dir=None, seq_len: int | None = None, paper_text_tokens: int = 512
) -> dict:
    """Paper Table 8 for model presets (abstract models: nothing is allocated): parameters, FLOPs in the
    paper's convention and of the full forward; prints it, writes `params.{md,json}` into out_dir when given."""

    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    cfgs = {n: get_preset(n) for n in names}
    table = flops.format_table_8(cfgs, seq_len, paper_text_tokens=paper_text_tokens)
    print(table)
    results = {
        n: {
            "params_flops": flops.params_flops_metrics(
                cfg, seq_len or flops.image_tokens(cfg) + 64, paper_text_tokens=paper_text_tokens
            )
        }
        for n, cfg in cfgs.items()
    }
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        report.write_json(results, out_dir / "params.json")
        (out_dir / "params.md").write_text(table + "\n")
    return results
