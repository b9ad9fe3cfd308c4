"""PEFT LoRA adapter directories: which base weights they adapt, with what (A, B, scale).

A PEFT adapter (`adapter_config.json` + `adapter_model.safetensors|.bin`) names its tensors
`base_model.model.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r], where <module> is a module path
of the base model in the base checkpoint's own key layout; merging is W + B @ A * scale with
scale = alpha / r (alpha / sqrt(r) with use_rslora). Non-LoRA tensors in the adapter (modules_to_save) and
LLaVA's `non_lora_trainables.bin` (the trained projector) replace base weights.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re

from rskd_jax.convert.errors import ConversionError, listing
from rskd_jax.convert.files import TensorRef, WeightSet
from rskd_jax.convert.hfconfig import read_json
from rskd_jax.convert.keymap import IGNORED, canonical_key

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclasses.dataclass
class LoraAdapter:
    path: pathlib.Path
    rank: int
    alpha: float
    scale: float
    dropout: float
    pairs: dict[str, tuple[TensorRef, TensorRef]]  # canonical base weight key -> (lora_A, lora_B)
    modules: dict[str, str]  # canonical base weight key -> canonical module key
    overrides: dict[str, TensorRef]  # canonical key -> replacement tensor
    origin: dict[str, str]  # canonical (or synthetic) key -> "file: original key", for messages


def open_lora(path: str | pathlib.Path, layout: str) -> LoraAdapter:
    """Reads a PEFT adapter whose module names follow the base checkpoint's `layout` (a keymap.RULES name)."""
    path = pathlib.Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: not a PEFT LoRA adapter directory (no adapter_config.json)")
    c = read_json(cfg_file)
    unsupported = [
        f"{k}={c[k]!r}"
        for k, ok in (
            ("peft_type", lambda v: v in (None, "LORA")),
            ("use_dora", lambda v: not v),
            ("rank_pattern", lambda v: not v),
            ("alpha_pattern", lambda v: not v),
            ("fan_in_fan_out", lambda v: not v),
            ("lora_bias", lambda v: not v),
            ("layer_replication", lambda v: not v),
            ("target_parameters", lambda v: not v),
            ("trainable_token_indices", lambda v: not v),
        )
        if k in c and not ok(c[k])
    ]
    if unsupported:
        raise ConversionError(f"{cfg_file}: unsupported adapter settings: {', '.join(unsupported)}")
    rank, alpha = int(c.get("r", 8)), float(c.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if c.get("use_rslora") else alpha / rank
    weights = WeightSet(path, ADAPTER_FILES)
    refs = dict(weights.refs)
    if (path / NON_LORA).is_file():
        refs.update(WeightSet(path / NON_LORA).refs)
    halves: dict[str, dict[str, TensorRef]] = {}
    overrides, origin, bad = {}, {}, []
    for key, ref in refs.items():
        where = f"{ref.file.name}: {key}"
        m = _LORA_KEY.match(key)
        if m:
            module, half = m.groups()
            weight = canonical_key(module + ".weight", layout)
            if weight is None:
                bad.append(where)
                continue
            halves.setdefault(weight, {})[half] = ref
            origin[weight[: -len(".weight")] + f".lora_{half}.weight"] = where
            if ref.info.shape and len(ref.info.shape) == 2 and half == "A" and ref.info.shape[0] != rank:
                bad.append(f"{where} has rank {ref.info.shape[0]}, adapter_config r={rank}")
            continue
        if "lora_" in key:  # lora_embedding_A/B, lora_magnitude_vector (DoRA), ...
            bad.append(f"{where} (unsupported LoRA tensor kind)")
            continue
        plain = re.sub(r"^base_model\.model\.", "", key)
        plain = re.sub(r"\.modules_to_save\.[A-Za-z0-9_]+\.", ".", plain)
        if IGNORED.search(plain):
            continue
        target = canonical_key(plain, layout)
        if target is None:
            bad.append(where)
            continue
        overrides[target], origin[target] = ref, where
    unpaired = [f"{w} (only lora_{next(iter(h))})" for w, h in halves.items() if len(h) != 2]
    if bad or unpaired:
        raise ConversionError(
            f"{path}: adapter tensors that map to no base-model weight: "
            + "; ".join(x for x in (listing("unknown", bad), listing("unpaired", unpaired)) if x)
        )
    pairs = {w: (h["A"], h["B"]) for w, h in halves.items()}
    modules = {w: w[: -len(".weight")] for w in pairs}
    return LoraAdapter(
        path, rank, alpha, scale, float(c.get("lora_dropout", 0.0)), pairs, modules, overrides, origin
    )
