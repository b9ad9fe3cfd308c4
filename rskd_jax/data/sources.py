"""Random-access sources (`len`, `[i]`) of plain-dict records for the Grain pipeline.

A record is `{"id": str, "image": path | bytes | PIL | uint8 array, "conversations": [{"from": "human" |
"gpt", "value": str}, ...], "task": str, "meta": dict}`. `meta` holds the structured ground truth the
evaluators need (class name, answer and question type, boxes, captions, ...). Records are built once at
construction (cheap metadata only); images are decoded later by the transform, so a missing or corrupt
image surfaces there (`DataError` naming the file). Malformed JSON and empty class folders fail here;
`skip_bad_records=True` skips and counts them (`source.bad.count`, each one logged) instead.

GeoChat prompt strings (geochat.md section 4): scene classification "Classify the given image in one of
the following classes. Classes: a, b, c. \\nAnswer in one word or a short phrase."; VQA question +
"\\nAnswer the question using a single word or phrase."; `[refer] Give me the location of <p> {x} </p>`;
`[grounding]{q}`; `[identify] What is the object present at {box}`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from rskd_jax.data.chat import IMAGE_TOKEN, normalize_turns
from rskd_jax.data.errors import BadRecords, DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SCENE_PROMPT = (
    "Classify the given image in one of the following classes. Classes: {classes}. "
    "\nAnswer in one word or a short phrase."
)
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
REFER_PROMPT = "[refer] Give me the location of <p> {expr} </p>"
GROUNDING_PROMPT = "[grounding]{question}"
IDENTIFY_PROMPT = "[identify] What is the object present at {box}"
CAPTION_PROMPT = (
    "Describe the image in one sentence."  # not a GeoChat string (UCM-captions is not in GeoChat)
)

# UC Merced folder names are concatenated words; GeoChat's prompt and answers use the spaced forms.
UCM_CLASS_NAMES = {
    "agricultural": "agricultural",
    "airplane": "airplane",
    "baseballdiamond": "baseball diamond",
    "beach": "beach",
    "buildings": "buildings",
    "chaparral": "chaparral",
    "denseresidential": "dense residential",
    "forest": "forest",
    "freeway": "freeway",
    "golfcourse": "golf course",
    "harbor": "harbor",
    "intersection": "intersection",
    "mediumresidential": "medium residential",
    "mobilehomepark": "mobile home park",
    "overpass": "overpass",
    "parkinglot": "parking lot",
    "river": "river",
    "runway": "runway",
    "sparseresidential": "sparse residential",
    "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
}


def class_words(folder: str) -> str:
    """Folder name -> words: UCM table, CamelCase (AID `DenseResidential`), `snake_case` (NWPU)."""
    if folder in UCM_CLASS_NAMES:
        return UCM_CLASS_NAMES[folder]
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", folder).replace("_", " ").replace("-", " ")
    return " ".join(words.split()).lower()


def human_gpt(question: str, answer: str | None) -> list[dict[str, str]]:
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def infer_task(question: str) -> str:
    """GeoChat task of an instruction from its text: task tags, the scene prompt, the VQA suffix."""
    for tag, task in (("[refer]", "refer"), ("[grounding]", "grounding"), ("[identify]", "region_caption")):
        if tag in question:
            return task
    if "Classify the given image" in question:
        return "scene"
    return "vqa" if "single word or phrase" in question else "instruct"


class ListSource:
    """Records held in a list (the base of every source here)."""

    name = "records"

    def __init__(self, records: Sequence[dict], name: str | None = None):
        self.records = list(records)
        if name:
            self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)})"


def read_json_records(path: str | os.PathLike, bad: BadRecords) -> list[Any]:
    """A JSON list file, or JSON lines (`.jsonl`; a malformed line is a bad record naming `path:line`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected JSON") from e
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON: {e}") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            bad(DataError(f"{path}:{n}: malformed JSON line: {e}"))
    return out


class InstructSource(ListSource):
    """GeoChat/LLaVA instruct JSON (`id`, `image`, `conversations`), `.json` list or `.jsonl`; images are
    `image_root / record["image"]`. Structure is validated here, images later by the transform. `task` is
    the record's own or inferred from the first question (`infer_task`).

    All records live in this object, which is pickled into each Grain worker; for very large sets prefer
    the ArrayRecord copy (`tfds_builders.GeochatInstruct` + `TfdsSource`), read lazily."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        skip_bad_records: bool = False,
    ):
        self.bad = BadRecords(skip_bad_records, str(path))
        root = pathlib.Path(image_root)
        records = []
        for k, r in enumerate(read_json_records(path, self.bad)):
            where = f"{path}[{k}] id={r.get('id') if isinstance(r, dict) else None}"
            try:
                if not isinstance(r, dict) or not isinstance(r.get("image"), str):
                    raise DataError(f"{where}: record needs a string 'image', got {r!r:.120}")
                normalize_turns(r.get("conversations"), where)
            except DataError as e:
                self.bad(e)
                continue
            records.append(
                {
                    "id": str(r.get("id", k)),
                    "image": str(root / r["image"]),
                    "conversations": r["conversations"],
                    "task": r.get("task") or infer_task(r["conversations"][0]["value"]),
                    "meta": {"source_index": k},
                }
            )
        if not records:
            skipped = f" ({self.bad.count} bad records skipped)" if self.bad.count else ""
            raise DataError(f"{path}: no usable records{skipped}; expected a list of instruct records")
        super().__init__(records, pathlib.Path(path).stem)


def _scene_root(root: pathlib.Path) -> pathlib.Path:
    """Descends through single-folder wrappers (`UCMerced_LandUse/Images/`, `AID/`) to the class folders."""
    while True:
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) != 1 or any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
            return root
        root = subdirs[0]


class SceneFolderSource(ListSource):
    """`<root>/<class>/*.{jpg,tif,...}` (UCMerced `UCMerced_LandUse/Images/...`, AID `AID/<Class>/...`) as
    scene-classification samples with GeoChat's prompt; the answer is the class in words.

    `class_names`: folder -> words (default `class_words`). The prompt lists classes in `class_order`
    (default: sorted folders). `meta`: `class` (folder), `label` (index), `class_name` (words), `classes`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        class_names: dict[str, str] | None = None,
        class_order: Sequence[str] | None = None,
        skip_bad_records: bool = False,
        exts: Iterable[str] = IMAGE_EXTS,
        name: str | None = None,
    ):
        root = pathlib.Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: scene folder not found")
        root = _scene_root(root)
        self.bad = BadRecords(skip_bad_records, str(root))
        exts = {e.lower() for e in exts}
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{root}: no class folders")
        files = {}
        for c in folders:
            fs = sorted(
                p for p in (root / c).iterdir() if p.suffix.lower() in exts and not p.name.startswith(".")
            )
            if not fs:
                self.bad(DataError(f"{root / c}: empty class folder (no {sorted(exts)} files)"))
                continue
            files[c] = fs
        self.classes = list(files)
        names = {c: (class_names or {}).get(c) or class_words(c) for c in self.classes}
        order = list(class_order) if class_order is not None else self.classes
        if sorted(order) != sorted(self.classes):
            raise DataError(f"{root}: class_order {order} does not match the folders {self.classes}")
        self.class_names = [names[c] for c in self.classes]
        self.prompt = SCENE_PROMPT.format(classes=", ".join(names[c] for c in order))
        records = [
            {
                "id": f"{c}/{f.name}",
                "image": str(f),
                "conversations": human_gpt(self.prompt, names[c]),
                "task": "scene",
                "meta": {"class": c, "label": i, "class_name": names[c], "classes": self.class_names},
            }
            for i, c in enumerate(self.classes)
            for f in files[c]
        ]
        super().__init__(records, name or (root.parent.name if root.name == "Images" else root.name))


class RSVQASource(ListSource):
    """RSVQA official JSON: `{prefix}_split_{split}_{questions,answers,images}.json` joined by id, inactive
    entries dropped; images `{image_dir}/{img_id}.tif`. LR: prefix "LR", images "Images_LR"; HR: prefix
    "USGS", images "Data" (HR test set 2 = split "test_phili"). Types: presence, comp, rural_urban, count,
    area; `exclude_types` defaults to count and area, which GeoChat does not evaluate.
    `meta`: `question_id`, `type`, `answer`, `img_id`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        prefix: str = "LR",
        image_dir: str | None = None,
        exclude_types: Sequence[str] = ("count", "area"),
        suffix: str = VQA_SUFFIX,
        skip_bad_records: bool = False,
    ):
        root = pathlib.Path(root)
        image_dir = image_dir or {"LR": "Images_LR", "USGS": "Data"}.get(prefix, "Images")
        self.bad = BadRecords(skip_bad_records, f"{root}/{prefix}_split_{split}")

        def load(kind):
            path = root / f"{prefix}_split_{split}_{kind}.json"
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))[kind]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}: expected a JSON object with a '{kind}' list: {e}") from e
            return {x["id"]: x for x in data if isinstance(x, dict) and x.get("active") and "id" in x}

        questions, answers, images = load("questions"), load("answers"), load("images")
        records = []
        for qid, q in sorted(questions.items()):
            where = f"{root}/{prefix}_split_{split}_questions.json id={qid}"
            try:
                ans = [answers[a]["answer"] for a in q.get("answers_ids", []) if a in answers]
                if not ans or q.get("img_id") not in images or not isinstance(q.get("question"), str):
                    raise DataError(f"{where}: no active answer / image / question text")
            except DataError as e:
                self.bad(e)
                continue
            if q.get("type") in exclude_types:
                continue
            records.append(
                {
                    "id": str(qid),
                    "image": str(root / image_dir / f"{q['img_id']}.tif"),
                    "conversations": human_gpt(q["question"] + suffix, ans[0]),
                    "task": "vqa",
                    "meta": {
                        "question_id": qid,
                        "type": q.get("type"),
                        "answer": ans[0],
                        "img_id": q["img_id"],
                    },
                }
            )
        super().__init__(records, f"rsvqa_{prefix}_{split}")


def polygon_to_box(poly: Sequence[float]) -> list[float]:
    """8 numbers (4 corners) -> axis-aligned [x1, y1, x2, y2]."""
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


class GeoChatBenchSource(ListSource):
    """GeoChat-Bench jsonl (geochat.md 4): `kind` in scene | vqa | referring | region_caption |
    grounding_description (detected from the fields when None). Prompts follow the official eval scripts.

    scene/vqa: `question_id`, `image`, `text` (already with the answer suffix), `ground_truth` | `category`
    (vqa has no answers: pass `answers` {question_id: answer}, e.g. from `RSVQASource` meta).
    referring: `question_id`, `image_id`, `question`, `ground_truth` (8-number polygons), `type` ref |
    grounding, ... -> `[refer] Give me the location of <p> {q} </p>` / `[grounding]{q}`.
    region_caption: `question_id`, `image_id`, `question` (box string), `ground_truth` (phrase).
    grounding_description: `image_id`, `description` (no box ground truth; prompt is an assumption).
    Records keep every jsonl field in `meta`; their conversation has a gpt turn only when the answer is known.
    """

    KINDS = ("scene", "vqa", "referring", "region_caption", "grounding_description")

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        kind: str | None = None,
        answers: dict | None = None,
        skip_bad_records: bool = False,
        image_ext: str = ".png",
    ):
        self.bad = BadRecords(skip_bad_records, str(path))
        root = pathlib.Path(image_root)
        rows = read_json_records(path, self.bad)
        records = []
        for k, r in enumerate(rows):
            try:
                if not isinstance(r, dict):
                    raise DataError(f"{path}:{k + 1}: expected a JSON object")
                kd = kind or self.detect(r, f"{path}:{k + 1}")
                records.append(self._record(r, kd, root, answers, image_ext, f"{path}:{k + 1}"))
            except (DataError, KeyError) as e:
                self.bad(e if isinstance(e, DataError) else DataError(f"{path}:{k + 1}: missing field {e}"))
        super().__init__(records, pathlib.Path(path).stem)

    @staticmethod
    def detect(r: dict, where: str) -> str:
        if "description" in r:
            return "grounding_description"
        if "category" in r:
            return "vqa"
        if "text" in r and "ground_truth" in r:
            return "scene"
        if "type" in r and "image_id" in r:
            return "referring"
        if "image_id" in r and "question" in r:
            return "region_caption"
        raise DataError(f"{where}: cannot tell the GeoChat-Bench kind from fields {sorted(r)}")

    @staticmethod
    def _image(root, name, ext):
        name = str(name)
        return str(root / (name if pathlib.Path(name).suffix else name + ext))

    def _record(self, r, kind, root, answers, ext, where):
        meta = dict(r)
        if kind == "scene":
            q, a, img, task = r["text"], None, self._image(root, r["image"], ext), "scene"
            meta["class"] = str(r["question_id"]).split("/")[0]
        elif kind == "vqa":
            q, img, task = r["text"], self._image(root, r["image"], ext), "vqa"
            a = None if answers is None else answers.get(r["question_id"])
            meta.update(type=r["category"], answer=a)
        elif kind == "referring":
            img, task = (
                self._image(root, r["image_id"], ext),
                ("refer" if r["type"] == "ref" else "grounding"),
            )
            q = (
                REFER_PROMPT.format(expr=r["question"])
                if r["type"] == "ref"
                else GROUNDING_PROMPT.format(question=r["question"])
            )
            a = None
            meta["boxes"] = [polygon_to_box(p) for p in r["ground_truth"]]
        elif kind == "region_caption":
            img, task = self._image(root, r["image_id"], ext), "region_caption"
            q, a = IDENTIFY_PROMPT.format(box=r["question"]), r["ground_truth"]
        elif kind == "grounding_description":
            img, task = self._image(root, r["image_id"], ext), "grounding_description"
            q, a = "[grounding] Describe the image in detail.", r["description"]
        else:
            raise DataError(f"{where}: unknown kind {kind!r}; expected one of {self.KINDS}")
        rid = str(r.get("question_id", r.get("image_id")))
        return {"id": rid, "image": img, "conversations": human_gpt(q, a), "task": task, "meta": meta}


class CaptionSource(ListSource):
    """Caption jsonl (`image`, `captions`, optional `class`), images `image_root / image` (e.g.
    ucm_captions.jsonl with `UCMerced_LandUse/Images`). `per_caption=True` gives one training record per
    (image, caption); otherwise one record per image answered by the first caption, all in `meta.captions`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        prompt: str = CAPTION_PROMPT,
        per_caption: bool = False,
        skip_bad_records: bool = False,
    ):
        self.bad = BadRecords(skip_bad_records, str(path))
        root = pathlib.Path(image_root)
        records = []
        for k, r in enumerate(read_json_records(path, self.bad)):
            caps = r.get("captions") if isinstance(r, dict) else None
            if (
                not isinstance(caps, list)
                or not caps
                or not isinstance(r.get("image"), str)
                or not all(isinstance(c, str) for c in caps)
            ):
                self.bad(
                    DataError(f"{path}:{k + 1}: need 'image' (str) and non-empty 'captions' (list of str)")
                )
                continue
            meta = {"captions": caps, "class": r.get("class")}
            for j, c in enumerate(caps if per_caption else caps[:1]):
                records.append(
                    {
                        "id": f"{r['image']}#{j}" if per_caption else r["image"],
                        "image": str(root / r["image"]),
                        "conversations": human_gpt(prompt, c.strip()),
                        "task": "caption",
                        "meta": meta,
                    }
                )
        super().__init__(records, pathlib.Path(path).stem)
