"""`load_pretrained`: a LlavaModel with weights from our checkpoint directory or, converted on the fly,
from any source the converter reads (HF Llava, original LLaVA / GeoChat, parts, + LoRA).

    model, cfg = load_pretrained("ckpts/geochat-7b")                     # our checkpoint (orbax restore)
    model, cfg = load_pretrained("hf/llava-1.5-7b-hf", dtype="bfloat16")  # HF directory, in memory
    model, cfg = load_pretrained(path, mesh=mesh)                         # sharded per parallel.rules

Parameters land directly in their target sharding (orbax restores each shard; the in-memory conversion fills
one parameter at a time). Every parameter is checked to come from the checkpoint: nothing is left at its
random initialisation.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

from rskd_jax.convert import ckpt, importer, keymap
from rskd_jax.convert.errors import ConversionError, listing
from rskd_jax.models.llava import LlavaModel
from rskd_jax.models.lora import LoRAConfig, apply_lora
from rskd_jax.models.presets import LlavaConfig
from rskd_jax.parallel import place
from rskd_jax.parallel.rules import named_shardings


def _abstract_model(cfg: LlavaConfig, lora_cfg: LoRAConfig | None) -> LlavaModel:
    def make():
        m = LlavaModel(cfg, rngs=nnx.Rngs(0))
        return apply_lora(m, lora_cfg, rngs=nnx.Rngs(1)) if lora_cfg is not None else m

    return nnx.eval_shape(make)


def _shardings(model: LlavaModel, mesh, rules=None) -> dict[tuple, jax.sharding.Sharding]:
    state = nnx.state(model, nnx.Param)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {tuple(k): dev for k, _ in nnx.to_flat_state(state)}

    tree = named_shardings(state, mesh, rules)
    return {tuple(k): v for k, v in nnx.to_flat_state(tree)}


def _fill(model: LlavaModel, arrays: dict[tuple, jax.Array]) -> LlavaModel:
    state = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(state))
    missing = [keymap.path_name(k) for k, _ in flat if tuple(k) not in arrays]
    if missing:
        raise ConversionError(listing("internal: parameters without a value", missing))
    for k, var in flat:
        var.set_value(arrays[tuple(k)])
    nnx.update(model, state)
    return model


def _overrides(cfg: LlavaConfig, dtype, compute_dtype, scan_layers, config_overrides) -> LlavaConfig:
    kw = dict(config_overrides)
    if dtype is not None:
        kw["param_dtype"] = np.dtype(jax.numpy.dtype(dtype)).name
        kw.setdefault("dtype", kw["param_dtype"])
    if compute_dtype is not None:
        kw["dtype"] = np.dtype(jax.numpy.dtype(compute_dtype)).name
    if scan_layers is not None:
        kw["scan_layers"] = scan_layers
    return cfg.replace(**kw)


def _specs(cfg, stacked_from) -> dict[tuple, ckpt.ParamSpec]:
    expected = importer.expected_params(cfg)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    return {p: ckpt.ParamSpec(s, dtype, p in stacked_from) for p, s in expected.items()}


def saved_lora_config(path: pathlib.Path) -> LoRAConfig | None:
    """The LoRAConfig of adapters kept in our checkpoint (`--lora-mode keep`), or None."""
    c = ckpt.read_provenance(path).get("lora_config")
    return (
        None if not c else LoRAConfig(**{**c, "targets": tuple(c["targets"]), "exclude": tuple(c["exclude"])})
    )


def _from_checkpoint(path: pathlib.Path, mesh, rules, kw) -> tuple[LlavaModel, LlavaConfig]:
    saved = LlavaConfig.from_dict(json.loads((path / ckpt.CONFIG).read_text()))
    lora_cfg = saved_lora_config(path)
    cfg = _overrides(saved, **kw)
    model = _abstract_model(cfg, lora_cfg)
    shard = _shardings(model, mesh, rules)
    reader = ckpt.CheckpointReader(path / ckpt.STATE)
    if cfg.scan_layers == saved.scan_layers:
        state = nnx.state(model, nnx.Param)
        flat = {tuple(k): v for k, v in nnx.to_flat_state(state)}
        have = set(reader.keys)
        want = {tuple(map(str, k)) for k in flat}
        if have != want:
            raise ConversionError(
                f"{path}: checkpoint does not match the model config: "
                + "; ".join(
                    x
                    for x in (
                        listing("missing", sorted(map(".".join, want - have))),
                        listing("unexpected", sorted(map(".".join, have - want))),
                    )
                    if x
                )
            )
        dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
        arrays = {}
        for k, v in flat.items():  # one parameter at a time, each process reading only its own shards
            key = tuple(map(str, k))
            stored = tuple(reader.array(key).shape)
            if stored != tuple(v.shape):
                raise ConversionError(
                    f"{path}: {'.'.join(key)} has shape {stored} in the checkpoint, the config needs {v.shape}"
                )
            arrays[k] = place.from_reader(
                v.shape, dtype, shard[k], lambda idx, out, key=key: reader.read_into(key, idx, out)
            )
        return _fill(model, arrays), cfg
    # Layout change (scanned <-> per-layer list): copy layer slices between the two layouts.
    if lora_cfg is not None:
        raise ConversionError(
            f"{path}: changing scan_layers of a checkpoint with kept LoRA adapters is not supported"
        )
    src_entries = {e.hf: e for e in keymap.entries(saved)}
    dst_entries = keymap.entries(cfg)
    specs = _specs(cfg, {e.param for e in dst_entries if e.layer is not None})
    sink = importer.ArraySink(specs, shard)
    for e in dst_entries:
        s = src_entries[e.hf]
        for rows in specs[e.param].blocks():
            sink.write(
                e.param, e.layer, rows, reader.read(s.param, s.layer, rows).astype(specs[e.param].dtype)
            )
    sink.finish()
    return _fill(model, sink.arrays), cfg


def load_pretrained(
    path: str | os.PathLike,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    compute_dtype=None,
    scan_layers: bool | None = None,
    rules=None,
    fmt: str = "auto",
    vision_tower: str | os.PathLike | None = None,
    mm_projector: str | os.PathLike | None = None,
    image_size: int | None = None,
    lora: str | os.PathLike | None = None,
    lora_mode: str = "merge",
    **config_overrides,
) -> tuple[LlavaModel, LlavaConfig]:
    """Returns (model, cfg) with every parameter loaded from `path`.

    path: our checkpoint directory (restored with orbax) or anything `rskd-convert import` reads (converted in
      memory; `fmt`, `vision_tower`, `mm_projector`, `image_size`, `lora`, `lora_mode` as for the CLI).
    dtype: parameter dtype (and the compute dtype unless `compute_dtype` is given); default: as stored.
    mesh: place parameters with `rskd_jax.parallel.rules` shardings on this mesh (default: device 0).
    scan_layers: change the layer layout (stacked for lax.scan <-> per-layer list); default: as stored.
    config_overrides: other LlavaConfig fields (remat_policy, attention_impl, ...).
    """
    path = pathlib.Path(path)
    kw = dict(
        dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers, config_overrides=config_overrides
    )
    if ckpt.is_checkpoint(path):
        return _from_checkpoint(path, mesh, rules, kw)
    source = importer.open_source(
        path, fmt, vision_tower=vision_tower, mm_projector=mm_projector, image_size=image_size
    )
    adapter = importer.open_lora(lora, source.layout) if lora is not None else None
    src_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype)).name
    plan = importer.build_plan(
        source,
        dtype=src_dtype,
        scan_layers=True if scan_layers is None else scan_layers,
        lora=adapter,
        lora_mode=lora_mode,
    )
    cfg = _overrides(plan.cfg, **{**kw, "dtype": None})  # build_plan applied `dtype` already
    model = _abstract_model(cfg, plan.lora_cfg)
    sink = importer.ArraySink(plan.params, _shardings(model, mesh, rules))
    importer.execute(plan, sink, progress=False)
    return _fill(model, sink.arrays), cfg
