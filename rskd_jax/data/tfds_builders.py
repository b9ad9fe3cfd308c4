"""TFDS builders (ArrayRecord files, no TensorFlow) that read a `manual_dir` and never download.

Build once, then read through `as_data_source()` (random access, picklable, usable in Grain workers):

    python -m rskd_jax.data.tfds_builders ucmerced --manual_dir /data/UCMerced_LandUse --data_dir /data/tfds
    src = TfdsSource("/data/tfds/ucmerced/1.0.0", "train")       # records like sources.SceneFolderSource

| builder | manual_dir holds | one example per | images |
|---|---|---|---|
| `ucmerced`, `aid` | `<class>/<file>` (or wrapped, `Images/<class>/`) | image (split `train`) | bytes |
| `rsvqa/lr`, `rsvqa/hr` | the RSVQA JSON files + `Images_LR/` or `Data/` | active question | rel. path |
| `geochat_instruct` | `GeoChat_Instruct.json` + images | conversation (split `train`) | rel. path |

UC Merced / AID have no official split: GeoChat evaluates scene classification on every image. RSVQA and
GeoChat-instruct store image paths, not bytes (an image serves many questions; the instruct images are
~100 GB), so reading them needs `image_root` = the manual_dir. Embedded images are checked to decode at
build time; bad records follow the sources' policy (`DataError`, or skip + count with
`skip_bad_records=True`). Examples are stored shuffled by TFDS; text comes back as bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rskd_jax.data import sources
from rskd_jax.data.errors import BadRecords, DataError
from rskd_jax.data.transforms import decode_image

_BYTES = dict(shape=(), dtype=np.object_)


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common: ArrayRecord output, manual_dir input, `skip_bad_records` option."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """This file. (TFDS's default lookup needs the `importlib_resources` package for modules inside a
        package; only the never-used checksums file is looked up next to it.)"""
        return epath.Path(__file__)

    def __init__(self, *, skip_bad_records: bool = False, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.skip_bad_records = skip_bad_records
        super().__init__(**kwargs)

    @classmethod
    def to_record(cls, example: dict, index: int, image_root: pathlib.Path | None) -> dict:
        raise NotImplementedError


class _SceneBuilder(_Builder, skip_registration=True):
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the class folders (<class>/<image>) or the dataset's root in manual_dir."
    )
    CLASSES: tuple[str, ...] = ()

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(**_BYTES),
                    "label": tfds.features.ClassLabel(names=list(self.CLASSES)),
                    "file_name": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        src = sources.SceneFolderSource(dl_manager.manual_dir, skip_bad_records=self.skip_bad_records)
        if src.classes != list(self.CLASSES):
            raise DataError(
                f"{dl_manager.manual_dir}: classes {src.classes} != expected {list(self.CLASSES)}"
            )
        return {"train": self._generate_examples(src)}

    def _generate_examples(self, src):
        bad = BadRecords(self.skip_bad_records, self.name)
        for r in src.records:
            try:
                decode_image(r["image"])  # fail (or skip) now, not in the middle of training
            except DataError as e:
                bad(e)
                continue
            yield (
                r["id"],
                {
                    "image": pathlib.Path(r["image"]).read_bytes(),
                    "label": r["meta"]["label"],
                    "file_name": r["id"],
                },
            )

    @classmethod
    def to_record(cls, example, index, image_root=None):
        names = list(cls.CLASSES)
        words = [sources.class_words(c) for c in names]
        c = names[int(example["label"])]
        prompt = sources.SCENE_PROMPT.format(classes=", ".join(words))
        return {
            "id": _text(example["file_name"]),
            "image": example["image"],
            "task": "scene",
            "conversations": sources.human_gpt(prompt, sources.class_words(c)),
            "meta": {
                "class": c,
                "label": int(example["label"]),
                "class_name": sources.class_words(c),
                "classes": words,
            },
        }


class Ucmerced(_SceneBuilder, skip_registration=True):
    """UC Merced Land Use: 21 classes x 100 aerial images (256 x 256, 1 ft/pixel)."""

    CLASSES = tuple(sorted(sources.UCM_CLASS_NAMES))


class Aid(_SceneBuilder, skip_registration=True):
    """AID: 30 aerial scene classes, 10,000 images (600 x 600)."""

    CLASSES = (
        "Airport BareLand BaseballField Beach Bridge Center Church Commercial DenseResidential Desert "
        "Farmland Forest Industrial Meadow MediumResidential Mountain Park Parking Playground Pond Port "
        "RailwayStation Resort River School SparseResidential Square Stadium StorageTanks Viaduct"
    ).split()


class Rsvqa(_Builder, skip_registration=True):
    """RSVQA (Lobry et al. 2020): one example per active question; configs `lr` (Sentinel-2), `hr` (USGS)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the official *_split_*_{questions,answers,images}.json and the image folder."
    )
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="lr", description="RSVQA-LR: splits train/val/test; images Images_LR/"),
        tfds.core.BuilderConfig(
            name="hr", description="RSVQA-HR: splits train/val/test/test_phili; images Data/"
        ),
    ]
    _PREFIX = {
        "lr": ("LR", "Images_LR", ("train", "val", "test")),
        "hr": ("USGS", "Data", ("train", "val", "test", "test_phili")),
    }

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image_path": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "type": tfds.features.Text(),
                    "question_id": np.int64,
                    "img_id": np.int64,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        prefix, image_dir, splits = self._PREFIX[self.builder_config.name]
        root = pathlib.Path(dl_manager.manual_dir)
        return {
            s: self._generate_examples(root, prefix, image_dir, s)
            for s in splits
            if (root / f"{prefix}_split_{s}_questions.json").is_file()
        }

    def _generate_examples(self, root, prefix, image_dir, split):
        src = sources.RSVQASource(
            root,
            split,
            prefix=prefix,
            image_dir=image_dir,
            exclude_types=(),
            skip_bad_records=self.skip_bad_records,
        )
        for r in src.records:
            m = r["meta"]
            question = r["conversations"][0]["value"].removeprefix(sources.IMAGE_TOKEN + "\n")
            question = question.removesuffix(sources.VQA_SUFFIX)
            yield (
                r["id"],
                {
                    "image_path": os.path.relpath(r["image"], root),
                    "question": question,
                    "answer": m["answer"],
                    "type": m["type"] or "",
                    "question_id": m["question_id"],
                    "img_id": m["img_id"],
                },
            )

    @classmethod
    def to_record(cls, example, index, image_root=None):
        if image_root is None:
            raise ValueError("rsvqa examples store image paths: pass image_root (the build's manual_dir)")
        q, a = _text(example["question"]), _text(example["answer"])
        return {
            "id": str(int(example["question_id"])),
            "image": str(pathlib.Path(image_root) / _text(example["image_path"])),
            "task": "vqa",
            "conversations": sources.human_gpt(q + sources.VQA_SUFFIX, a),
            "meta": {
                "question_id": int(example["question_id"]),
                "type": _text(example["type"]),
                "answer": a,
                "img_id": int(example["img_id"]),
            },
        }


class GeochatInstruct(_Builder, skip_registration=True):
    """GeoChat_Instruct (LLaVA-format conversations); images are referenced, not embedded."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put GeoChat_Instruct.json (or any LLaVA-format .json/.jsonl) and its images."
    )
    JSON_NAME = "GeoChat_Instruct.json"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image_path": tfds.features.Text(),
                    "conversations_json": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        path = root / self.JSON_NAME
        if not path.is_file():
            found = sorted(root.glob("*.json")) + sorted(root.glob("*.jsonl"))
            if len(found) != 1:
                raise DataError(
                    f"{root}: expected {self.JSON_NAME} (or exactly one .json/.jsonl), found {found}"
                )
            path = found[0]
        return {"train": self._generate_examples(path, root)}

    def _generate_examples(self, path, root):
        src = sources.InstructSource(path, root, skip_bad_records=self.skip_bad_records)
        for k, r in enumerate(src.records):
            yield (
                k,
                {
                    "id": r["id"],
                    "image_path": os.path.relpath(r["image"], root),
                    "conversations_json": json.dumps(r["conversations"]),
                },
            )

    @classmethod
    def to_record(cls, example, index, image_root=None):
        if image_root is None:
            raise ValueError(
                "geochat_instruct examples store image paths: pass image_root (the build's manual_dir)"
            )
        return {
            "id": _text(example["id"]),
            "image": str(pathlib.Path(image_root) / _text(example["image_path"])),
            "task": "instruct",
            "conversations": json.loads(_text(example["conversations_json"])),
            "meta": {},
        }


BUILDERS = {"ucmerced": Ucmerced, "aid": Aid, "rsvqa": Rsvqa, "geochat_instruct": GeochatInstruct}


def build(
    name: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    config: str | None = None,
    skip_bad_records: bool = False,
) -> tfds.core.DatasetBuilder:
    """Generates the ArrayRecord files once (a no-op when they exist) and returns the builder."""
    cls = BUILDERS[name]
    builder = cls(data_dir=str(data_dir), config=config, skip_bad_records=skip_bad_records)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


class TfdsSource:
    """Random-access source of records (as in `sources`) over a built dataset's `as_data_source(split)`.

    `builder_dir` is the versioned folder (e.g. `<data_dir>/ucmerced/1.0.0`, `<data_dir>/rsvqa/lr/1.0.0`).
    """

    def __init__(
        self, builder_dir: str | os.PathLike, split: str, image_root: str | os.PathLike | None = None
    ):
        builder = tfds.builder_from_directory(str(builder_dir))
        name = builder.info.name
        if name not in BUILDERS:
            raise ValueError(f"{builder_dir}: unknown dataset {name!r}; known {sorted(BUILDERS)}")
        self.cls, self.name = BUILDERS[name], f"{name}:{split}"
        self.data = builder.as_data_source(split=split)
        self.image_root = None if image_root is None else pathlib.Path(image_root)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.cls.to_record(self.data[index], index, self.image_root)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, n={len(self)})"


def main(argv=None):
    p = argparse.ArgumentParser(description="Build an rskd-jax TFDS dataset (ArrayRecord) from a manual_dir.")
    p.add_argument("name", choices=sorted(BUILDERS))
    p.add_argument("--manual_dir", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--config", default=None, help="rsvqa: lr | hr")
    p.add_argument("--skip_bad_records", action="store_true")
    a = p.parse_args(argv)
    b = build(a.name, a.manual_dir, a.data_dir, config=a.config, skip_bad_records=a.skip_bad_records)
    print(b.data_dir, {k: v.num_examples for k, v in b.info.splits.items()})


if __name__ == "__main__":
    main()
