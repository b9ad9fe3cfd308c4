"""Input-pipeline throughput: the Grain pipeline vs a torch DataLoader doing the same work.

Both decode the real UC Merced JPEGs and apply the same GeoChat preprocessing (expand2square, PIL bicubic
resize, centre crop, CLIP normalisation; `rskd_jax.data.transforms`) at 224 and 504 px, in 2 worker
processes, batch 32. Reported, as medians of alternating runs: steady-state images/s (after the first
batch, i.e. excluding worker start-up), the start-up time, and the ratio Grain / torch.

    RSKD_SHARED_DATA=../shared/data python bench/input.py [--quick] [--out bench/results/input.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # runs without `pip install -e .`

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from rskd_jax.data import pipeline  # noqa: E402
from rskd_jax.data.sources import SceneFolderSource  # noqa: E402
from rskd_jax.data.transforms import decode_image, preprocess_image  # noqa: E402


class ImageTransform:
    """Record -> {"pixel_values", "label"}: the image half of ExampleTransform (text is negligible)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, record):
        x = preprocess_image(decode_image(record["image"]), self.size)
        return {"pixel_values": x, "label": np.int32(record["meta"]["label"])}


class TorchSet:
    """torch Dataset over the same source and transform."""

    def __init__(self, src, transform):
        self.src, self.transform = src, transform

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return self.transform(self.src[i])


def _time(it, n_batches: int, batch_size: int) -> dict:
    t0 = time.perf_counter()
    next(it)
    t1 = time.perf_counter()
    for _ in range(n_batches - 1):
        next(it)
    t2 = time.perf_counter()
    return {
        "startup_s": round(t1 - t0, 2),
        "images_per_s": round((n_batches - 1) * batch_size / (t2 - t1), 1),
    }


def bench_grain(src, size, batch_size, n_batches, workers, read_threads=1):
    ds = pipeline.make_dataset(
        src,
        ImageTransform(size),
        batch_size=batch_size,
        seed=0,
        shard_index=0,
        shard_count=1,
        read_threads=read_threads,
    )
    it = pipeline.make_iterator(ds, num_workers=workers)
    try:
        return _time(it, n_batches, batch_size)
    finally:
        if hasattr(it, "close"):
            it.close()
        del it
        gc.collect()


def bench_torch(src, size, batch_size, n_batches, workers):
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        TorchSet(src, ImageTransform(size)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(0),
    )

    def forever():
        while True:
            yield from loader

    return _time(forever(), n_batches, batch_size)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("RSKD_SHARED_DATA", "../shared/data"))
    p.add_argument("--quick", action="store_true", help="fewer batches, 224 px only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--read_threads", type=int, default=1, help="Grain threads per worker (1 is best on 2 cores)"
    )
    p.add_argument("--reps", type=int, default=0, help="alternating runs per size (default 3, quick 2)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    flags.FLAGS.mark_as_parsed()
    root = pathlib.Path(a.data) / "UCMerced_LandUse"
    if not root.is_dir():
        raise SystemExit(f"{root} not found: pass --data or set RSKD_SHARED_DATA")
    src = SceneFolderSource(root)
    sizes, n_batches = ((224,), 12) if a.quick else ((224, 504), 46)  # 46 x 32 = 1472 ~ one epoch of UCM
    reps = a.reps or (2 if a.quick else 3)
    rows = []
    for size in sizes:  # grain and torch alternate, medians over `reps` runs (the machine may be shared)
        runs = [
            (
                bench_grain(src, size, a.batch_size, n_batches, a.workers, a.read_threads),
                bench_torch(src, size, a.batch_size, n_batches, a.workers),
            )
            for _ in range(reps)
        ]
        g = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
        t = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
        ratio = round(g["images_per_s"] / t["images_per_s"], 3)
        rows.append({"size": size, "grain": g, "torch": t, "ratio": ratio, "runs": runs})
        print(
            f"{size:4d} px  grain {g['images_per_s']:8.1f} img/s (start {g['startup_s']:.1f} s)   "
            f"torch {t['images_per_s']:8.1f} img/s (start {t['startup_s']:.1f} s)   ratio {ratio:.2f}  "
            f"(median of {reps})",
            flush=True,
        )
    result = {
        "workers": a.workers,
        "batch_size": a.batch_size,
        "batches": n_batches,
        "reps": reps,
        "images": len(src),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
