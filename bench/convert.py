"""Converter memory/time benchmark: a synthetic >= 1 GB HF Llava checkpoint -> import -> export.

Each conversion runs in a fresh child process that reports its own wall time, peak RSS (VmHWM from
/proc/self/status) and peak anonymous memory (RssAnon, sampled every 2 ms by a thread; file-backed pages of
memory-mapped inputs/outputs are reclaimable page cache and are excluded from it). The goal is peak RssAnon <=
0.4 x the checkpoint size; the start-up baseline (Python + jax + tensorstore, before any tensor) is
reported.
The exported tensors are compared with the source ones (must be identical).

    python bench/convert.py                # ~1.08 GB float16 checkpoint, writes bench/results/convert.json
    python bench/convert.py --quick --out /tmp/convert_quick.json   # ~6 MB, used by a test
    python bench/convert.py --source-format bin                     # pytorch_model-*.bin source instead
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # text / vision dims of the synthetic model
    "full": dict(hidden=2048, mlp=5504, layers=8, vocab=32000, v_hidden=256, v_layers=4, image=224),
    "quick": dict(hidden=256, mlp=512, layers=2, vocab=4096, v_hidden=64, v_layers=2, image=56),
}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


class AnonSampler(threading.Thread):
    """Samples RssAnon of this process every `period` seconds; `peak` is the high-water mark."""

    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self._done = period, _status()["RssAnon"], threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self.period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _status()["RssAnon"])
        return self.peak


def child(command: str, src: str, dst: str) -> None:
    """Runs one conversion in this (fresh) process and prints its measurements as JSON."""
    from launch.convert import tune_malloc  # what the CLI does first

    tune_malloc()
    sampler = AnonSampler()
    sampler.start()
    from rskd_jax.convert import export_checkpoint, import_checkpoint

    base = _status()
    t0 = time.time()
    if command == "import":
        import_checkpoint(src, dst, progress=False)
    else:
        export_checkpoint(src, dst, progress=False, max_shard_size="400MB")
    seconds = time.time() - t0
    peak_anon = sampler.stop()
    end = _status()
    print(
        json.dumps(
            dict(
                seconds=round(seconds, 2),
                vm_hwm=end["VmHWM"],
                peak_rss_anon=peak_anon,
                baseline_rss_anon=base["RssAnon"],
                baseline_vm_rss=base["VmRSS"],
            )
        )
    )


def run_child(command: str, src: pathlib.Path, dst: pathlib.Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a conversion job would run
    proc = subprocess.run(
        [sys.executable, __file__, "--child", command, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{command} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_checkpoint(d: pathlib.Path, size: str, source_format: str) -> dict:
    """A random float16 HF Llava checkpoint in the 4.x llava-hf layout, sharded, written tensor by tensor."""
    import ml_dtypes  # noqa: F401  (numpy bfloat16 registration used by the writer's dtype table)
    import numpy as np

    from rskd_jax.convert.files import SafetensorsWriter, TensorInfo

    s = SIZES[size]
    h, m, v, vh = s["hidden"], s["mlp"], s["vocab"], s["v_hidden"]
    shapes = {}
    vp = "vision_tower.vision_model."
    shapes[vp + "embeddings.class_embedding"] = (vh,)
    shapes[vp + "embeddings.patch_embedding.weight"] = (vh, 3, 14, 14)
    shapes[vp + "embeddings.position_embedding.weight"] = ((s["image"] // 14) ** 2 + 1, vh)
    for n in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{vp}{n}.weight"] = shapes[f"{vp}{n}.bias"] = (vh,)
    for i in range(s["v_layers"]):
        p = f"{vp}encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            shapes[f"{p}self_attn.{n}_proj.weight"], shapes[f"{p}self_attn.{n}_proj.bias"] = (vh, vh), (vh,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{n}.weight"] = shapes[f"{p}{n}.bias"] = (vh,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (4 * vh, vh), (4 * vh,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (vh, 4 * vh), (vh,)
    shapes["multi_modal_projector.linear_1.weight"], shapes["multi_modal_projector.linear_1.bias"] = (
        (h, vh),
        (h,),
    )
    shapes["multi_modal_projector.linear_2.weight"], shapes["multi_modal_projector.linear_2.bias"] = (
        (h, h),
        (h,),
    )
    shapes["language_model.model.embed_tokens.weight"] = (v, h)
    for i in range(s["layers"]):
        p = f"language_model.model.layers.{i}."
        for n in "qkvo":
            shapes[f"{p}self_attn.{n}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (m, h)
        shapes[p + "mlp.down_proj.weight"] = (h, m)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["language_model.model.norm.weight"] = (h,)
    shapes["language_model.lm_head.weight"] = (v, h)

    rng = np.random.default_rng(0)
    infos = {k: TensorInfo(shape, np.dtype(np.float16)) for k, shape in shapes.items()}
    total = sum(i.nbytes for i in infos.values())
    shards, cur = [[]], 0
    for k, info in infos.items():
        if cur and cur + info.nbytes > 400e6:
            shards.append([])
            cur = 0
        shards[-1].append(k)
        cur += info.nbytes
    d.mkdir(parents=True)
    weight_map = {}
    ext, stem = ("safetensors", "model") if source_format == "safetensors" else ("bin", "pytorch_model")
    for i, keys in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        weight_map.update({k: name for k in keys})
        if ext == "safetensors":
            w = SafetensorsWriter(d / name, {k: infos[k] for k in keys})
            for k in keys:
                view = w.tensor(k)
                flat = view.reshape(-1)
                for a in range(0, flat.size, 2**24):
                    b = min(flat.size, a + 2**24)
                    flat[a:b] = (rng.random(b - a, dtype=np.float32) - 0.5).astype(np.float16)
                view.flush()
                del view, flat
        else:
            import torch

            part = {
                k: torch.from_numpy((rng.random(shapes[k], dtype=np.float32) - 0.5).astype(np.float16))
                for k in keys
            }
            torch.save(part, d / name)
            del part
    (d / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": v - 1,
        "text_config": {
            "model_type": "llama",
            "vocab_size": v,
            "hidden_size": h,
            "intermediate_size": m,
            "num_hidden_layers": s["layers"],
            "num_attention_heads": h // 128,
            "num_key_value_heads": h // 128,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vh,
            "intermediate_size": 4 * vh,
            "num_hidden_layers": s["v_layers"],
            "num_attention_heads": max(1, vh // 64),
            "image_size": s["image"],
            "patch_size": 14,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return dict(
        bytes=total,
        params=total // 2,
        tensors=len(infos),
        shards=len(shards),
        dtype="float16",
        layout="llava-hf 4.x",
        format=source_format,
    )


def identical(src: pathlib.Path, out: pathlib.Path) -> bool:
    """Every source tensor equals the exported one (same 4.x key)."""
    import numpy as np

    from rskd_jax.convert.files import Reader, WeightSet

    a, b, reader = WeightSet(src), WeightSet(out), Reader()
    if a.refs.keys() != b.refs.keys():
        return False
    ok = all(np.array_equal(reader.get(a.refs[k]), reader.get(b.refs[k])) for k in a.refs)
    reader.release()
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--source-format", default="safetensors", choices=("safetensors", "bin"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert.json"))
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory, removed)")
    p.add_argument("--child", nargs=3, metavar=("COMMAND", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="rskd_bench_convert_"))
    try:
        t0 = time.time()
        ck = make_checkpoint(work / "src", "quick" if args.quick else "full", args.source_format)
        gen = time.time() - t0
        imp = run_child("import", work / "src", work / "ours")
        exp = run_child("export", work / "ours", work / "hf")
        same = identical(work / "src", work / "hf")
        ours_bytes = sum(f.stat().st_size for f in (work / "ours").rglob("*") if f.is_file())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for r in (imp, exp):
        r["peak_rss_anon_over_checkpoint"] = round(r["peak_rss_anon"] / ck["bytes"], 3)
        r["vm_hwm_over_checkpoint"] = round(r["vm_hwm"] / ck["bytes"], 3)
        r["gb_per_s"] = round(ck["bytes"] / 1e9 / r["seconds"], 3)
    result = dict(
        mode="quick" if args.quick else "full",
        checkpoint=ck,
        generate_seconds=round(gen, 1),
        import_=imp,
        export=exp,
        our_checkpoint_bytes=ours_bytes,
        roundtrip_identical=same,
        goal="peak RssAnon <= 0.4 x checkpoint bytes (import and export)",
        goal_met=all(r["peak_rss_anon_over_checkpoint"] <= 0.4 for r in (imp, exp)),
        machine=dict(cpus=os.cpu_count(), python=platform.python_version(), platform=platform.platform()),
    )
    result["import"] = result.pop("import_")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
