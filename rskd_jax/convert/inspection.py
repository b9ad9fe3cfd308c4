"""`rskd-convert inspect PATH`: what a checkpoint is, its config, parameter counts per component and dtypes.

Reads headers and metadata only (no tensor data), so it is instant on any size.
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np

from rskd_jax.convert import ckpt, hfconfig
from rskd_jax.convert.errors import ConversionError
from rskd_jax.convert.files import WeightSet
from rskd_jax.convert.keymap import IGNORED, LLM, LM_HEAD, PROJECTOR, VISION, canonical_key
from rskd_jax.convert.lora import ADAPTER_FILES
from rskd_jax.convert.sources import detect_format, open_source


def _summary(items) -> dict:
    """items: (component, shape, dtype name) -> {params: {component: n, total}, dtypes: {dtype: n}}."""
    params, dtypes = collections.Counter(), collections.Counter()
    for comp, shape, dtype in items:
        n = int(np.prod(shape, dtype=np.int64))
        params[comp] += n
        dtypes[dtype] += n
    return {"params": {**dict(sorted(params.items())), "total": sum(params.values())}, "dtypes": dict(dtypes)}


def _component(canon: str | None) -> str:
    if canon is None:
        return "unmapped"
    for prefix, name in ((VISION, "vision"), (PROJECTOR, "projector"), (LLM, "llm"), (LM_HEAD, "llm")):
        if canon.startswith(prefix):
            return name
    return "unmapped"


def inspect_path(path: str | pathlib.Path) -> dict:
    """A JSON-able description of PATH (our checkpoint, a PEFT adapter, or a source checkpoint directory)."""
    path = pathlib.Path(path)
    if ckpt.is_checkpoint(path):
        reader = ckpt.CheckpointReader(path / ckpt.STATE)
        items = []
        for key in reader.keys:
            a = reader.array(key)
            comp = "lora" if key[-1] in ("lora_a", "lora_b") else key[0]
            items.append((comp, tuple(a.shape), np.dtype(a.dtype.numpy_dtype).name))
        return {
            "path": str(path),
            "format": "rskd-jax checkpoint",
            "tensors": len(items),
            "config": hfconfig.read_json(path / ckpt.CONFIG),
            **_summary(items),
            "provenance": ckpt.read_provenance(path),
        }
    if (path / "adapter_config.json").is_file():
        ws = WeightSet(path, ADAPTER_FILES)
        c = hfconfig.read_json(path / "adapter_config.json")
        items = [("lora", r.info.shape, r.info.dtype.name) for r in ws.refs.values()]
        return {
            "path": str(path),
            "format": "peft-lora",
            "tensors": len(items),
            "adapter": {
                k: c.get(k)
                for k in (
                    "r",
                    "lora_alpha",
                    "lora_dropout",
                    "target_modules",
                    "use_rslora",
                    "use_dora",
                    "base_model_name_or_path",
                )
            },
            **_summary(items),
        }
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory")
    ws = WeightSet(path)
    config = hfconfig.read_json(path / "config.json") if (path / "config.json").is_file() else {}
    fmt = detect_format(path, config, list(ws.refs))
    layout = {"hf-llava": "hf-llava", "llava": "llava", "geochat": "llava", "llama": "llama"}[fmt]
    buffers = [k for k in ws.refs if IGNORED.search(k)]
    items = [
        (_component(canonical_key(k, layout)), r.info.shape, r.info.dtype.name)
        for k, r in ws.refs.items()
        if not IGNORED.search(k)
    ]
    out = {
        "path": str(path),
        "format": fmt,
        "files": [f.name for f in ws.files],
        "tensors": len(items),
        "buffers": len(buffers),
        "bytes": ws.nbytes,
        **_summary(items),
    }
    if fmt != "llama":
        try:
            src = open_source(path, fmt)
            out["config"] = src.cfg.to_dict()
            out["unexpected"], out["ignored"] = src.unexpected[:20], src.ignored[:20]
        except ConversionError as e:
            out["config_error"] = str(e)
    return out
