"""rs-synth: a procedural synthetic remote-sensing instruction set, generated from a seed at any image size.

Every task the project evaluates, with GeoChat's prompt strings and answer formats:

* `scene`: 8 visually distinct scene classes (colour + texture): forest, water, farmland, residential,
  airport, harbour, desert, parking; GeoChat's classification prompt, answer = class name.
* `vqa`: `meta.type` presence ("Is there a ship in the image?" -> Yes/No), comp ("Are there more planes
  than vehicles?" -> Yes/No), rural_urban ("Is it a rural or an urban area?" -> rural/urban).
* `refer` (`[refer] Give me the location of <p> ship </p>` -> `{<x1><y1><x2><y2>|<θ>}`), `grounding`
  (`[grounding]Where are the ships in the image?` -> `<p>ships</p>{...}{...}`), `region_caption`
  (`[identify] What is the object present at {...}` -> `ship`), and a templated `caption`.

Objects: plane, ship, vehicle, storage tank, building, with integer boxes on GeoChat's 0-100 grid and a
rotation θ (integer degrees, multiples of `angle_step`, in [0, 180)). A box `{<x1><y1><x2><y2>|<θ>}` is the
object's unrotated rectangle; the object is that rectangle rotated about its centre by θ with OpenCV's
`getRotationMatrix2D` convention (positive = counter-clockwise on screen, y down), which is how GeoChat's
demo draws boxes. `meta.objects[i].polygon` holds the rotated corners (8 numbers, 0-100) as well.

Record i depends only on (seed, split, i), so any record is computable independently (random access) and
the same seed gives the same records. Images are uint8 arrays rendered at `image_size`; geometry lives on
the 0-100 grid, so the text is identical at every size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from rskd_jax.data.chat import IMAGE_TOKEN, LLAVA_V1, VICUNA_V1, normalize_turns, render
from rskd_jax.data.sources import GROUNDING_PROMPT, IDENTIFY_PROMPT, REFER_PROMPT, SCENE_PROMPT, VQA_SUFFIX
from rskd_jax.data.tokenizer import train_tokenizer

SCENES = ("forest", "water", "farmland", "residential", "airport", "harbour", "desert", "parking")
URBAN = ("residential", "airport", "harbour", "parking")
OBJECTS = ("plane", "ship", "vehicle", "storage tank", "building")
PLURAL = {
    "plane": "planes",
    "ship": "ships",
    "vehicle": "vehicles",
    "storage tank": "storage tanks",
    "building": "buildings",
}
SCENE_OBJECTS = {
    "forest": ("building",),
    "water": ("ship",),
    "farmland": ("building", "storage tank"),
    "residential": ("building", "vehicle"),
    "airport": ("plane", "vehicle", "storage tank"),
    "harbour": ("ship", "storage tank"),
    "desert": ("storage tank", "vehicle"),
    "parking": ("vehicle",),
}
DEFAULT_TASKS = {
    "scene": 0.25,
    "presence": 0.15,
    "comp": 0.1,
    "rural_urban": 0.1,
    "refer": 0.15,
    "grounding": 0.1,
    "region_caption": 0.1,
    "caption": 0.05,
}
# The groups the evaluation scores separately (rskd_jax.eval.runner.TASK_GROUP): `task_cycle` draws a record's
# task within a group.
TASK_GROUPS = {
    "scene": ("scene",),
    "vqa": ("presence", "comp", "rural_urban"),
    "grounding": ("refer", "grounding"),
    "region_caption": ("region_caption",),
    "caption": ("caption",),
}
SPLITS = {"train": 0, "val": 1, "test": 2}
# (long side range, short side range) on the 0-100 grid, and whether the object rotates.
_SIZES = {
    "plane": ((17, 24), None, True),
    "ship": ((15, 23), (5, 8), True),
    "vehicle": ((9, 12), (4, 6), True),
    "storage tank": ((10, 15), None, False),
    "building": ((11, 17), (8, 12), False),
}
_HARBOUR_SHORE = 45  # water is x < 45 in harbour scenes
_COLORS = ((200, 35, 35), (35, 70, 210), (235, 205, 40), (245, 245, 245))  # vehicles


def format_box(box: Sequence[float], angle: int = 0) -> str:
    """GeoChat box text `{<x1><y1><x2><y2>|<θ>}` (integers on the 0-100 grid)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"{{<{x1}><{y1}><{x2}><{y2}>|<{int(angle)}>}}"


def rotate(points: np.ndarray, center: tuple[float, float], angle: float) -> np.ndarray:
    """Rotates [N, 2] (x, y) points about `center` like cv2.getRotationMatrix2D(center, angle, 1)."""
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    d = points - np.asarray(center)
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], -1) + np.asarray(center)


def box_polygon(box: Sequence[float], angle: float) -> np.ndarray:
    """The 4 corners [4, 2] of `box` rotated by `angle` about its centre (TL, TR, BR, BL before rotation)."""
    x1, y1, x2, y2 = box
    pts = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
    return rotate(pts, ((x1 + x2) / 2, (y1 + y2) / 2), angle)


def _noise(rng, size: int, cells: int, amp: float) -> np.ndarray:
    """Smooth value noise [size, size] in [-amp, amp] (bilinear upsampling of a cells x cells grid)."""
    g = rng.uniform(-amp, amp, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g, "F").resize((size, size), Image.Resampling.BILINEAR))


def _background(scene: str, rng, size: int) -> np.ndarray:
    """float32 [size, size, 3] scene background with a class-specific colour and texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)

    def fill(col, mask=None):
        col = np.asarray(col, np.float32)
        if mask is None:
            img[...] = col
        else:
            img[mask] = col

    if scene == "forest":
        fill((30, 85, 35))
        img += _noise(rng, size, 8, 28)[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    elif scene == "water":
        fill((35, 80, 165))
        img += (8 * np.sin(2 * np.pi * (yy * rng.uniform(6, 10) + rng.uniform())))[..., None]
    elif scene == "farmland":
        n = rng.integers(4, 7)
        stripes = ((xx if rng.integers(2) else yy) * n).astype(int) % 2 == 0
        fill((205, 185, 95))
        fill((110, 165, 55), stripes)
    elif scene == "residential":
        fill((170, 168, 160))
        step = rng.uniform(0.22, 0.3)
        roads = ((xx % step) < 0.035) | ((yy % step) < 0.035)
        fill((95, 95, 100), roads)
    elif scene == "airport":
        fill((125, 135, 115))
        c = rng.uniform(0.3, 0.7)
        fill((205, 205, 205), np.abs(yy - c) < 0.08)
        fill((250, 250, 250), (np.abs(yy - c) < 0.01) & ((xx * 10).astype(int) % 2 == 0))
    elif scene == "harbour":
        fill((160, 155, 145))
        fill((35, 80, 165), xx < _HARBOUR_SHORE / 100)
        for y0 in rng.uniform(0.1, 0.85, 2):
            fill((150, 145, 135), (np.abs(yy - y0) < 0.03) & (xx > 0.25))
    elif scene == "desert":
        fill((215, 185, 125))
        f = rng.uniform(3, 6)
        img += (14 * np.sin(2 * np.pi * f * (xx + 0.6 * yy) + rng.uniform(0, 6)))[..., None]
    elif scene == "parking":
        fill((65, 65, 72))
        fill((235, 235, 235), ((xx * 8) % 1 < 0.06) & ((yy * 2) % 1 < 0.8))
    img *= rng.uniform(0.9, 1.1)
    img += rng.normal(0, 5, (size, size, 1)).astype(np.float32)
    return img


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: float) -> None:
    """Draws one object (its geometry is on the 0-100 grid; `scale` = pixels per unit)."""
    x1, y1, x2, y2 = obj["box"]
    a = obj["angle"]
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1

    def poly(points, fill):
        pts = rotate(np.asarray(points, np.float64), (cx, cy), a) * scale
        draw.polygon([tuple(p) for p in pts], fill=fill)

    name = obj["name"]
    if name == "plane":  # fuselage along x, wings along y
        poly(
            [[x1, cy - 0.09 * h], [x2, cy - 0.09 * h], [x2, cy + 0.09 * h], [x1, cy + 0.09 * h]],
            (236, 236, 242),
        )
        poly(
            [[cx - 0.12 * w, y1], [cx + 0.08 * w, y1], [cx + 0.08 * w, y2], [cx - 0.12 * w, y2]],
            (236, 236, 242),
        )
        poly(
            [
                [x1, cy - 0.3 * h],
                [x1 + 0.12 * w, cy - 0.3 * h],
                [x1 + 0.12 * w, cy + 0.3 * h],
                [x1, cy + 0.3 * h],
            ],
            (236, 236, 242),
        )
    elif name == "ship":  # pointed bow at +x
        poly([[x1, y1], [x2 - 0.25 * w, y1], [x2, cy], [x2 - 0.25 * w, y2], [x1, y2]], (225, 222, 210))
        poly(
            [
                [x1 + 0.2 * w, cy - 0.2 * h],
                [x1 + 0.45 * w, cy - 0.2 * h],
                [x1 + 0.45 * w, cy + 0.2 * h],
                [x1 + 0.2 * w, cy + 0.2 * h],
            ],
            (120, 120, 125),
        )
    elif name == "vehicle":
        poly([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], obj["color"])
    elif name == "storage tank":
        draw.ellipse(
            [x1 * scale, y1 * scale, x2 * scale, y2 * scale],
            fill=(246, 246, 246),
            outline=(150, 150, 150),
            width=max(1, int(0.12 * w * scale / 2)),
        )
    elif name == "building":
        poly([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], (120, 60, 40))
        poly(
            [
                [x1 + 0.12 * w, y1 + 0.12 * h],
                [x2 - 0.12 * w, y1 + 0.12 * h],
                [x2 - 0.12 * w, y2 - 0.12 * h],
                [x1 + 0.12 * w, y2 - 0.12 * h],
            ],
            (200, 115, 60),
        )


class SynthSource:
    """`num_records` rs-synth records for `split` (train/val/test use disjoint random streams).

    `tasks`: task -> weight (keys of `DEFAULT_TASKS`). Record: `id`, `image` (uint8 [S, S, 3]),
    `conversations`, `task`, `meta` (`scene`, `label`, `objects` [{name, box, angle, polygon}], `answer`,
    `type` for vqa, `targets` = indices into `objects` for refer/grounding/region_caption).
    """

    name = "rs_synth"

    def __init__(
        self,
        num_records: int = 10_000,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        tasks: dict[str, float] | None = None,
        angle_step: int = 15,
        max_objects: int = 3,
        grid: int = 1,
        object_scale: float = 1.0,
        task_cycle: Sequence[str] = (),
        cycle_block: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} not in {sorted(SPLITS)}")
        tasks = dict(DEFAULT_TASKS if tasks is None else tasks)
        unknown = set(tasks) - set(DEFAULT_TASKS)
        if unknown or not tasks:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(DEFAULT_TASKS)}")
        self.num_records, self.image_size, self.seed, self.split = num_records, image_size, seed, split
        self.task_names = list(tasks)
        p = np.asarray([tasks[t] for t in self.task_names], np.float64)
        self.task_probs = p / p.sum()
        if grid < 1 or 100 % grid or object_scale <= 0 or not 1 <= angle_step <= 180:
            raise ValueError(
                f"grid={grid} must divide 100, object_scale={object_scale} must be > 0, "
                f"angle_step={angle_step} must be in [1, 180]"
            )
        self.angle_step, self.max_objects = angle_step, max_objects
        self.grid, self.object_scale = grid, object_scale
        bad = [g for g in task_cycle if not set(TASK_GROUPS.get(g, ("?",))) & set(tasks)]
        if bad or cycle_block < 1:
            raise ValueError(
                f"task_cycle {list(task_cycle)}: groups {bad} have no task in {sorted(tasks)} (groups: "
                f"{sorted(TASK_GROUPS)}); cycle_block={cycle_block} must be >= 1"
            )
        self.task_cycle, self.cycle_block = tuple(task_cycle), int(cycle_block)
        self.scene_prompt = SCENE_PROMPT.format(classes=", ".join(SCENES))

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        n, size, seed, split = self.num_records, self.image_size, self.seed, self.split
        return f"SynthSource(n={n}, size={size}, seed={seed}, split={split!r})"

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], index]))

    def _snap(self, size) -> int:
        """An object side (0-100 grid units at object_scale 1) scaled, on the `grid`, at least one cell."""
        g = self.grid
        return max(g, int(round(float(size) * self.object_scale / g)) * g)

    def _corner(self, rng, side: int) -> int:
        """A random top/left coordinate on the `grid` keeping a side of `side` inside [1, 99]."""
        if self.grid == 1:
            return int(rng.integers(1, 100 - side))
        g = self.grid
        return int(rng.integers(1, max(2, (99 - side) // g + 1))) * g

    def _objects(self, rng, scene: str, n: int) -> list[dict]:
        objs = []
        for _ in range(n):
            name = SCENE_OBJECTS[scene][rng.integers(len(SCENE_OBJECTS[scene]))]
            (lo, hi), short, rot = _SIZES[name]
            for _ in range(30):  # rejection sampling: inside the image, no overlap, ships on water
                w = self._snap(rng.integers(lo, hi + 1))
                h = w if short is None else self._snap(rng.integers(short[0], short[1] + 1))
                angle = int(rng.integers(0, 180 // self.angle_step)) * self.angle_step if rot else 0
                x1, y1 = self._corner(rng, w), self._corner(rng, h)
                box = [x1, y1, x1 + w, y1 + h]
                poly = box_polygon(box, angle)
                lo_xy, hi_xy = poly.min(0), poly.max(0)
                if lo_xy.min() < 1 or hi_xy.max() > 99:
                    continue
                if scene == "harbour" and (
                    hi_xy[0] >= _HARBOUR_SHORE if name == "ship" else lo_xy[0] < _HARBOUR_SHORE + 3
                ):
                    continue  # ships on the water, everything else on land
                if any(
                    lo_xy[0] < o["aabb"][2] + 2
                    and o["aabb"][0] < hi_xy[0] + 2
                    and lo_xy[1] < o["aabb"][3] + 2
                    and o["aabb"][1] < hi_xy[1] + 2
                    for o in objs
                ):
                    continue
                objs.append(
                    {
                        "name": name,
                        "box": box,
                        "angle": angle,
                        "polygon": np.round(poly.reshape(-1), 2).tolist(),
                        "aabb": [*lo_xy, *hi_xy],
                        "color": _COLORS[rng.integers(len(_COLORS))],
                    }
                )
                break
        objs.sort(key=lambda o: (o["box"][0] + o["box"][2], o["box"][1] + o["box"][3]))  # left to right
        return objs

    def _task(self, rng, task: str, scene: str, objs: list[dict]) -> tuple[str, str, dict]:
        """(question, answer, extra meta) for `task`."""
        names = [o["name"] for o in objs]
        if task == "scene":
            return self.scene_prompt, scene, {}
        if task == "rural_urban":
            ans = "urban" if scene in URBAN else "rural"
            return "Is it a rural or an urban area?" + VQA_SUFFIX, ans, {"type": "rural_urban"}
        if task == "presence":
            name = (
                names[rng.integers(len(names))] if names and rng.uniform() < 0.5 else OBJECTS[rng.integers(5)]
            )
            return (
                f"Is there a {name} in the image?" + VQA_SUFFIX,
                "Yes" if name in names else "No",
                {"type": "presence"},
            )
        if task == "comp":
            a, b = rng.choice(len(OBJECTS), 2, replace=False)
            a, b = OBJECTS[a], OBJECTS[b]
            if names and rng.uniform() < 0.7:
                a = names[rng.integers(len(names))]
                b = b if b != a else OBJECTS[(OBJECTS.index(a) + 1) % 5]
            ans = "Yes" if names.count(a) > names.count(b) else "No"
            return f"Are there more {PLURAL[a]} than {PLURAL[b]}?" + VQA_SUFFIX, ans, {"type": "comp"}
        if task == "refer":  # a type with one instance, or the leftmost of several
            cands = [
                (i, o["name"] if names.count(o["name"]) == 1 else f"leftmost {o['name']}")
                for i, o in enumerate(objs)
                if names.count(o["name"]) == 1 or names.index(o["name"]) == i
            ]
            i, expr = cands[rng.integers(len(cands))]
            return (
                REFER_PROMPT.format(expr=expr),
                format_box(objs[i]["box"], objs[i]["angle"]),
                {"targets": [i]},
            )
        if task == "grounding":
            name = names[rng.integers(len(names))]
            idx = [i for i, n in enumerate(names) if n == name]
            phrase = name if len(idx) == 1 else PLURAL[name]
            boxes = "".join(format_box(objs[i]["box"], objs[i]["angle"]) for i in idx)
            return (
                GROUNDING_PROMPT.format(question=f"Where are the {PLURAL[name]} in the image?"),
                f"<p>{phrase}</p>{boxes}",
                {"targets": idx},
            )
        if task == "region_caption":
            i = int(rng.integers(len(objs)))
            return (
                IDENTIFY_PROMPT.format(box=format_box(objs[i]["box"], objs[i]["angle"])),
                objs[i]["name"],
                {"targets": [i]},
            )
        if task == "caption":
            counts = [
                f"{names.count(n)} {PLURAL[n] if names.count(n) > 1 else n}" for n in OBJECTS if n in names
            ]
            what = " and ".join(counts) if counts else "no objects"
            article = "An" if scene[0] in "aeiou" else "A"
            return "Describe the image briefly.", f"{article} {scene} scene with {what}.", {}
        raise ValueError(task)

    def sample(self, index: int) -> tuple[dict, list[dict], np.random.Generator]:
        """The record without its image, the objects to draw, and the generator positioned to draw it."""
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = self._rng(index)
        label = int(rng.integers(len(SCENES)))
        scene = SCENES[label]
        task = self.task_names[rng.choice(len(self.task_names), p=self.task_probs)]
        if self.task_cycle:  # blocks of `cycle_block` records per group, the task drawn within the group
            group = TASK_GROUPS[self.task_cycle[(index // self.cycle_block) % len(self.task_cycle)]]
            names = [t for t in self.task_names if t in group]
            p = np.asarray([self.task_probs[self.task_names.index(t)] for t in names])
            task = names[rng.choice(len(names), p=p / p.sum())]
        needs_obj = task in ("refer", "grounding", "region_caption")
        n = int(rng.integers(1 if needs_obj else 0, self.max_objects + 1))
        objs = self._objects(rng, scene, n)
        if needs_obj and not objs:
            task = "scene"
        question, answer, extra = self._task(rng, task, scene, objs)
        meta = {
            "scene": scene,
            "label": label,
            "answer": answer,
            "classes": list(SCENES),
            "objects": [{k: o[k] for k in ("name", "box", "angle", "polygon")} for o in objs],
            **extra,
        }
        record = {
            "id": f"synth-{self.split}-{self.seed}-{index}",
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "task": "vqa" if task in ("presence", "comp", "rural_urban") else task,
            "meta": meta,
        }
        return record, objs, rng

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        record, objs, rng = self.sample(index)
        size = self.image_size
        img = Image.fromarray(
            np.clip(_background(record["meta"]["scene"], rng, size), 0, 255).astype(np.uint8)
        )
        draw = ImageDraw.Draw(img)
        for obj in objs:
            _draw_object(draw, obj, size / 100)
        record["image"] = np.asarray(img)
        return record

    def texts(self, n: int | None = None) -> list[str]:
        """The first `n` conversations rendered with both chat templates (no `<image>`), e.g. to train a
        tokenizer."""
        out = []
        for i in range(min(n or self.num_records, self.num_records)):
            msgs = normalize_turns(self.sample(i)[0]["conversations"])
            out += [render(msgs, t).replace(IMAGE_TOKEN, " ") for t in (VICUNA_V1, LLAVA_V1)]
        return out


def train_synth_tokenizer(out_dir, vocab_size: int = 800, num_records: int = 2000, seed: int = 0):
    """A small LLaMA-like tokenizer (with `<image>`) trained on rs-synth conversations (both chat
    templates), saved as an HF tokenizer directory; for the demo and tests."""

    return train_tokenizer(SynthSource(num_records, seed=seed).texts(), out_dir, vocab_size=vocab_size)
