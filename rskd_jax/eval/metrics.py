"""Task scorers for the GeoChat benchmarks: pure functions over (prediction, reference) lists.

All accuracies, ROUGE and METEOR values are in percent (0–100), as in the paper's tables. Every scorer
returns a dict with a ``task`` key (``scene`` / ``vqa`` / ``grounding`` / ``caption``) that
``rskd_jax.eval.report`` uses to lay out tables.

Conventions (GeoChat ships no scorer except for scene classification; see geochat.md §4):
* Scene: robust matching of free text to class names (see ``ClassMatcher``); ``strict=True`` is GeoChat's
  own rule ``answer.replace(' ', '').lower().replace('.', '') == class``. OA = correct / all, AA = mean of
  per-class recall over classes present in the ground truth.
* VQA: answers normalised (yes/no, rural/urban, number words). The headline ``moa`` is the accuracy POOLED
  over the kept types (= ``moa_micro``): GeoChat's "average accuracy", and what the seed paper's Table 5
  reports (every HRBEN row fits 0.440·presence + 0.560·comparison, e.g. 0.440·57.65 + 0.560·80.84 = 70.63,
  while the mean of types would give 69.25). The mean of the per-type accuracies (``moa_macro``) is
  reported next to it, not used by the paper. count/area are reported but not in mOA.
* Grounding: a sample is correct at threshold t when its predicted boxes can be matched one-to-one to ALL
  ground-truth boxes with IoU >= t (maximum bipartite matching via the Hungarian algorithm on the
  thresholded IoU matrix, i.e. exact); extra predicted boxes are not penalised; no parsable box = miss.
* Captions: ROUGE-1/ROUGE-L F-measure (rouge-score, Porter stemmer), max over references, mean over
  samples; METEOR 1.5 from pycocoevalcap's jar (corpus-level, COCO convention; per-sample mean too).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from rskd_jax.eval import boxes as boxlib


def _pct(num: float, den: float) -> float | None:
    return 100.0 * num / den if den else None


# ============================================================================ scene classification


def canonical(text: str) -> str:
    """Lower-case letters and digits only: "Medium Residential." -> "mediumresidential"."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _words(text: str) -> list[str]:
    """Lower-case words, splitting CamelCase ("StorageTanks" -> storage, tanks) and all punctuation."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    return re.findall(r"[a-z0-9]+", text.lower())


def _number_forms(key: str) -> set[str]:
    """Singular and plural spellings of a canonical key (ends only: "storagetanks" <-> "storagetank")."""
    forms = {key, key + "s"}
    if re.search(r"(s|x|z|ch|sh)$", key):
        forms.add(key + "es")
    if re.search(r"[^aeiou]y$", key):
        forms.add(key[:-1] + "ies")
    if key.endswith("ies"):
        forms.add(key[:-3] + "y")
    if re.search(r"(s|x|z|ch|sh)es$", key):
        forms.add(key[:-2])
    if key.endswith("s") and not key.endswith("ss"):
        forms.add(key[:-1])
    return forms


class ClassMatcher:
    """Maps free-text answers and quirky ground-truth labels to class indices.

    A text matches class c when its canonical form (``canonical``) equals a singular/plural form of c's
    canonical name, possibly after dropping a trailing "gt" (AID jsonl quirk "MediumResidentialgt").
    Otherwise every run of up to ``max_span`` consecutive words is joined and looked up the same way
    ("There is a tennis court." -> tenniscourt); runs inside a longer matching run are ignored; if runs
    of two different classes remain the answer is ambiguous and matches nothing.
    """

    def __init__(self, classes: Sequence[str], max_span: int = 6):
        self.classes = list(classes)
        self.max_span = max_span
        keys = [canonical(c) for c in self.classes]
        self.keys = keys
        if len(set(keys)) != len(keys) or "" in keys:
            raise ValueError(f"class names must be distinct and non-empty once canonical: {self.classes}")
        self._form: dict[str, int] = {k: i for i, k in enumerate(keys)}
        clashes: set[str] = set()
        for i, k in enumerate(keys):
            for f in _number_forms(k) - {k}:
                if f in keys:
                    continue
                if f in self._form and self._form[f] != i:
                    clashes.add(f)
                self._form.setdefault(f, i)
        for f in clashes:
            del self._form[f]

    def _lookup(self, key: str) -> int | None:
        if key in self._form:
            return self._form[key]
        if key.endswith("gt") and key[:-2] in self._form:
            return self._form[key[:-2]]
        return None

    def match(self, text: str, strict: bool = False) -> int | None:
        """Class index of a model answer, or None when it names no class (or several)."""
        if not isinstance(text, str):
            return None
        text = text.replace("</s>", "")
        if strict:  # GeoChat batch_geochat_scene.py: pred.replace(' ','').lower().replace('.','') == gt
            pred = text.replace(" ", "").lower().replace(".", "")
            return next((i for i, c in enumerate(self.classes) if pred == c.replace(" ", "").lower()), None)
        found = self._lookup(canonical(text))
        if found is not None:
            return found
        words = _words(text)
        spans = []
        for i in range(len(words)):
            for j in range(i + 1, min(len(words), i + self.max_span) + 1):
                c = self._lookup("".join(words[i:j]))
                if c is not None:
                    spans.append((i, j, c))
        spans = [s for s in spans if not any(t != s and t[0] <= s[0] and s[1] <= t[1] for t in spans)]
        hits = {c for _, _, c in spans}
        return hits.pop() if len(hits) == 1 else None

    def match_gt(self, label: str | int) -> int:
        """Class index of a ground-truth label (int index or name); raises on labels that name no class."""
        if isinstance(label, (int, np.integer)):
            if not 0 <= label < len(self.classes):
                raise ValueError(f"ground-truth index {label} out of range for {len(self.classes)} classes")
            return int(label)
        found = self._lookup(canonical(str(label)))
        if found is None:
            raise ValueError(f"ground-truth label {label!r} matches none of the classes {self.classes}")
        return found


def scene_scores(
    preds: Sequence[str], gts: Sequence[str | int], classes: Sequence[str], strict: bool = False
) -> dict:
    """Overall/average accuracy and confusion matrix of scene-classification answers.

    Returns dict(task, oa, aa, per_class {name: recall % or None}, confusion [C, C+1] int (rows = true
    class, last column = answers matching no class), classes, n, unmatched, strict).
    """
    if len(preds) != len(gts):
        raise ValueError(f"scene_scores: {len(preds)} predictions vs {len(gts)} ground truths")
    m = ClassMatcher(classes)
    c = len(m.classes)
    conf = np.zeros((c, c + 1), dtype=np.int64)
    for p, g in zip(preds, gts):
        j = m.match(p, strict=strict)
        conf[m.match_gt(g), c if j is None else j] += 1
    totals = conf.sum(1)
    recall = [_pct(conf[i, i], totals[i]) for i in range(c)]
    present = [r for r in recall if r is not None]
    return dict(
        task="scene",
        oa=_pct(np.trace(conf[:, :c]), conf.sum()),
        aa=float(np.mean(present)) if present else None,
        per_class=dict(zip(m.classes, recall)),
        confusion=conf,
        classes=m.classes,
        n=int(conf.sum()),
        unmatched=int(conf[:, c].sum()),
        strict=strict,
    )


# ============================================================================ VQA

TYPE_ALIASES = {
    "presence": "presence",
    "comp": "comparison",
    "comparison": "comparison",
    "rural_urban": "rural_urban",
    "rural/urban": "rural_urban",
    "ruralurban": "rural_urban",
    "rural urban": "rural_urban",
    "count": "count",
    "area": "area",
}
MOA_TYPES = ("presence", "comparison", "rural_urban")
_CLOSED = ("yes", "no", "rural", "urban")
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


def normalize_vqa_answer(text: str) -> str:
    """Canonical VQA answer: closed-vocabulary words (yes/no/rural/urban) when the answer starts with one or
    contains exactly one of them; number words -> digits; otherwise GeoChat's rule (lower-case, spaces and
    periods removed: "0 m2." -> "0m2")."""
    s = str(text).replace("</s>", "").strip().lower()
    words = re.findall(r"[a-z0-9]+", s)
    if words and words[0] in _CLOSED:
        return words[0]
    closed = {w for w in words if w in _CLOSED}
    if len(closed) == 1:
        return closed.pop()
    if words and words[0] in _NUMBER_WORDS and len(words) == 1:
        return _NUMBER_WORDS[words[0]]
    return s.replace(" ", "").replace(".", "")


def vqa_scores(
    preds: Sequence[str],
    gts: Sequence[str],
    types: Sequence[str],
    strict: bool = False,
    moa_types: Sequence[str] = MOA_TYPES,
) -> dict:
    """Per-type accuracy and mOA: ``moa`` (headline) = ``moa_micro`` = pooled over ``moa_types`` (the paper's
    Table 5 convention), ``moa_macro`` = mean of their accuracies (for comparison only).

    ``types`` are RSVQA / GeoChat-Bench categories (``comp`` is read as ``comparison``); unknown types are
    kept under their own name. ``strict=True`` uses the community GeoChat rule
    ``pred.replace(' ','').lower().replace('.','') == gt.lower()``.
    """
    if not len(preds) == len(gts) == len(types):
        raise ValueError(f"vqa_scores: {len(preds)} preds, {len(gts)} gts, {len(types)} types differ")
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    for p, g, t in zip(preds, gts, types):
        t = TYPE_ALIASES.get(str(t).strip().lower(), str(t))
        if strict:
            ok = str(p).replace(" ", "").lower().replace(".", "") == str(g).lower()
        else:
            ok = normalize_vqa_answer(p) == normalize_vqa_answer(g)
        count[t] = count.get(t, 0) + 1
        correct[t] = correct.get(t, 0) + int(ok)
    kept = [t for t in moa_types if t in count]
    per_type = {t: _pct(correct[t], count[t]) for t in count}
    pooled = _pct(sum(correct[t] for t in kept), sum(count[t] for t in kept))
    return dict(
        task="vqa",
        per_type=per_type,
        n_per_type=dict(count),
        moa=pooled,
        moa_convention="pooled over the kept types (correct / questions): the paper's Table 5 mOA",
        moa_micro=pooled,
        moa_macro=float(np.mean([per_type[t] for t in kept])) if kept else None,
        moa_types=kept,
        n=len(preds),
        strict=strict,
    )


# ============================================================================ grounding / referring


_GROUP_ORDER = {
    v: i for i, v in enumerate(["small", "medium", "large", "single", "multi", "ref", "refer", "grounding"])
}  # the paper's column order


def _gt_objects(gt, image_size) -> list[np.ndarray]:
    if isinstance(gt, str):
        objs = boxlib.parse_boxes(gt)
    else:
        objs = list(gt)
        if objs and np.ndim(objs[0]) == 0:  # a single flat box / polygon
            objs = [objs]
    polys = [boxlib.as_polygon(o) for o in objs]
    if image_size is not None:
        polys = [boxlib.scale_polygon(p, image_size) for p in polys]
    return polys


def _all_matched(m: np.ndarray, thr: float) -> bool:
    """Can every ground-truth row get its own prediction column with IoU >= thr? (exact, Hungarian)."""
    n_gt, n_pred = m.shape
    if n_gt == 0 or n_pred < n_gt:
        return False
    ok = (m >= thr).astype(np.float64)
    rows, cols = linear_sum_assignment(ok, maximize=True)
    return int(ok[rows, cols].sum()) == n_gt


def grounding_scores(
    pred_texts: Sequence[str],
    gt_boxes_list: Sequence,
    thresholds: Sequence[float] = (0.5, 0.25),
    *,
    rotated: bool = True,
    groups: Mapping[str, Sequence] | None = None,
    gt_image_sizes: Sequence[tuple[float, float]] | None = None,
) -> dict:
    """acc@t for referring / grounding outputs (see module doc for the matching rule).

    gt_boxes_list: per sample a list of objects, each 4 numbers (x1,y1,x2,y2), 5 (+θ), 8 (4-point polygon,
    GeoChat-Bench) or a [4, 2] array, on the 0–100 grid — or in pixels with ``gt_image_sizes`` = per sample
    (width, height); a GeoChat box string is accepted too. ``rotated=False`` compares enclosing axis-aligned
    boxes (the HBB protocol of most re-runs). ``groups`` = {name: per-sample labels} (e.g. size_group,
    type) adds per-label accuracies; the ``objects`` grouping (single / multi) is always added.
    Returns dict(task, acc@t... (%), mean_iou (a fraction: per ground-truth object, its IoU under the
    max-IoU one-to-one assignment, 0 when unmatched), n, n_no_box, by_group).
    """
    if len(pred_texts) != len(gt_boxes_list):
        raise ValueError(f"grounding_scores: {len(pred_texts)} predictions vs {len(gt_boxes_list)} GTs")
    if gt_image_sizes is not None and len(gt_image_sizes) != len(pred_texts):
        raise ValueError("grounding_scores: gt_image_sizes must give one (width, height) per sample")
    groups = dict(groups or {})
    for name, labels in groups.items():
        if len(labels) != len(pred_texts):
            raise ValueError(f"grounding_scores: group {name!r}: {len(labels)} labels, not {len(pred_texts)}")
    hits = {t: np.zeros(len(pred_texts), dtype=bool) for t in thresholds}
    ious, n_no_box, n_objects = [], 0, []
    for k, (text, gt) in enumerate(zip(pred_texts, gt_boxes_list)):
        gts = _gt_objects(gt, None if gt_image_sizes is None else gt_image_sizes[k])
        if not gts:
            raise ValueError(f"grounding_scores: sample {k} has no ground-truth box")
        preds = boxlib.parse_boxes(text)
        n_objects.append("single" if len(gts) == 1 else "multi")
        if not preds:
            n_no_box += 1
            ious.extend([0.0] * len(gts))
            continue
        m = boxlib.iou_matrix(preds, gts, rotated=rotated)
        r, c = linear_sum_assignment(m, maximize=True)
        best = np.zeros(len(gts))
        best[r] = m[r, c]
        ious.extend(best.tolist())
        for t in thresholds:
            hits[t][k] = _all_matched(m, t)
    groups.setdefault("objects", n_objects)
    out = dict(
        task="grounding",
        n=len(pred_texts),
        n_no_box=n_no_box,
        rotated=rotated,
        mean_iou=float(np.mean(ious)) if ious else None,
    )
    for t in thresholds:
        out[f"acc@{t:g}"] = _pct(hits[t].sum(), len(pred_texts))
    by_group: dict = {}
    for name, labels in groups.items():
        labels = np.asarray([str(x) for x in labels])
        by_group[name] = {}
        for v in sorted(set(labels.tolist()), key=lambda v: (_GROUP_ORDER.get(v, len(_GROUP_ORDER)), v)):
            sel = labels == v
            by_group[name][v] = {
                "n": int(sel.sum()),
                **{f"acc@{t:g}": _pct(hits[t][sel].sum(), sel.sum()) for t in thresholds},
            }
    out["by_group"] = by_group
    return out


# ============================================================================ region captioning


def clean_caption(text: str) -> str:
    """Drop ``<p>``/``</p>``/``</s>``, box strings and periods; collapse whitespace (re-run recipe)."""
    s = str(text).replace("</s>", " ").replace("<p>", " ").replace("</p>", " ")
    s = re.sub(r"\{[^{}]*\}", " ", s).replace(".", " ").replace("|||", " ")
    return " ".join(s.split())


def _as_refs(refs, k: int) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    refs = [clean_caption(r) for r in refs]
    if not refs:
        raise ValueError(f"caption sample {k} has no reference caption")
    return refs


def rouge_scores(preds: Sequence[str], refs_list: Sequence) -> dict:
    """Mean over samples of the best-reference ROUGE-1 / ROUGE-L F-measure (rouge-score, stemmer), in %."""
    from rouge_score import rouge_scorer  # noqa: PLC0415 (rouge_score pulls in nltk; only caption scoring)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for k, (p, refs) in enumerate(zip(preds, refs_list)):
        p = clean_caption(p)
        scores = [scorer.score(r, p) for r in _as_refs(refs, k)]
        r1.append(max(s["rouge1"].fmeasure for s in scores))
        rl.append(max(s["rougeL"].fmeasure for s in scores))
    return dict(
        rouge1=100 * float(np.mean(r1)),
        rougeL=100 * float(np.mean(rl)),
        rouge1_per_sample=r1,
        rougeL_per_sample=rl,
    )


class MeteorScorer:
    """METEOR 1.5 (``-l en -norm``) in a long-lived Java process, talking the jar's ``-stdio`` protocol.

    ``SCORE ||| ref1 ||| ... ||| hyp`` returns a statistics line per segment; ``EVAL ||| stats ||| ...``
    returns one score per segment and then the corpus score (same as pycocoevalcap's wrapper, which we
    do not use because it can hang on text with newlines and never drains stderr).
    """

    def __init__(self):
        java = shutil.which("java")
        if java is None:
            raise RuntimeError(
                "METEOR needs a Java runtime (`java` on PATH), e.g. "
                "`apt-get install openjdk-17-jre-headless`; "
                "or score captions with meteor=False (ROUGE only)."
            )
        spec = importlib.util.find_spec("pycocoevalcap")
        jar = (
            None
            if spec is None or not spec.submodule_search_locations
            else os.path.join(list(spec.submodule_search_locations)[0], "meteor", "meteor-1.5.jar")
        )
        if jar is None or not os.path.exists(jar):
            raise RuntimeError("METEOR needs pycocoevalcap==1.2 (meteor-1.5.jar): pip install -e '.[eval]'")
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=os.path.dirname(jar),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._lock = threading.Lock()

    def _ask(self, line: str, n_out: int = 1) -> list[str]:
        self._proc.stdin.write((line + "\n").encode())
        self._proc.stdin.flush()
        out = []
        for _ in range(n_out):
            r = self._proc.stdout.readline()
            if not r:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"METEOR java process died: {err}")
            out.append(r.decode().strip())
        return out

    def score(self, preds: Sequence[str], refs_list: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus METEOR, per-segment METEOR), both in [0, 1]. Texts are used as given (after newline /
        '|||' removal); the jar lower-cases and tokenises itself (-norm)."""

        def clean(s):
            return " ".join(str(s).replace("|||", " ").split())

        with self._lock:
            stats = [
                self._ask(" ||| ".join(["SCORE", *[clean(r) for r in refs], clean(p)]))[0]
                for p, refs in zip(preds, refs_list)
            ]
            if not stats:
                return 0.0, []
            out = self._ask(" ||| ".join(["EVAL", *stats]), len(stats) + 1)
        return float(out[-1]), [float(x) for x in out[:-1]]

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()


@functools.cache
def meteor_scorer() -> MeteorScorer:
    """The process-wide METEOR scorer (the JVM takes several seconds to load the paraphrase tables)."""
    scorer = MeteorScorer()
    atexit.register(scorer.close)
    return scorer


def caption_scores(preds: Sequence[str], refs_list: Sequence, meteor: bool = True) -> dict:
    """ROUGE-1, ROUGE-L and METEOR (%) of region captions against one or several references per sample.

    Both prediction and references are cleaned with ``clean_caption``. ``meteor`` = corpus-level METEOR
    (pycocoevalcap / COCO convention), ``meteor_mean`` = mean of per-sample METEOR. The ``*_per_sample``
    lists are in [0, 1]; the first call starts the METEOR JVM (several seconds), later calls reuse it.
    """
    if len(preds) != len(refs_list):
        raise ValueError(f"caption_scores: {len(preds)} predictions vs {len(refs_list)} reference lists")
    out = dict(task="caption", n=len(preds), **rouge_scores(preds, refs_list))
    if meteor:
        refs = [_as_refs(r, k) for k, r in enumerate(refs_list)]
        corpus, per = meteor_scorer().score([clean_caption(p) for p in preds], refs)
        out.update(
            meteor=100 * corpus, meteor_mean=100 * float(np.mean(per)) if per else None, meteor_per_sample=per
        )
    return out
