"""Export: our parameters (a checkpoint directory, a training checkpoint, or an in-memory model) -> an HF
LlavaForConditionalGeneration directory in the 4.x llava-hf key layout (loads in transformers 4.57 and 5.x).

Written: config.json, generation_config.json, sharded safetensors (+ index), the tokenizer with `<image>`,
preprocessor_config.json (CLIPImageProcessor at the model's resolution) and processor_config.json. Tensors
stream block by block from the source into memory maps of the output files. LoRA adapters are merged on the
way (W + A @ B * scale). When the image token id lies outside the vocabulary (original LLaVA / GeoChat keep
32000 words and a placeholder id 32000), the embedding and lm_head gain rows up to that id, set to the mean
of the existing rows (transformers embeds the image token id before replacing it, so it must be in range).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rskd_jax.convert import ckpt, hfconfig, keymap
from rskd_jax.convert.errors import ConversionError
from rskd_jax.convert.files import SafetensorsWriter, TensorInfo, drop_pages, parse_size, release_memory
from rskd_jax.convert.importer import (
    DTYPES,
    IMAGE_TOKEN,
    _pick_dtype,
    check_destination,
    commit,
    temp_dir_for,
)
from rskd_jax.convert.sources import TOKENIZER_FILES
from rskd_jax.models.layers import Linear
from rskd_jax.models.presets import LlavaConfig
from rskd_jax.parallel import place

log = logging.getLogger(__name__)
BLOCK_BYTES = 32 * 2**20


class CheckpointParams:
    """Parameters read from an orbax checkpoint (ours or a training state's subtree at `prefix`)."""

    def __init__(self, state_dir: pathlib.Path, cfg: LlavaConfig, lora_alpha: float | None, prefix=()):
        self.reader = ckpt.CheckpointReader(state_dir, prefix)
        self.lora_alpha = lora_alpha
        self._stacked = {e.param for e in keymap.entries(cfg) if e.layer is not None}

    def has(self, path: tuple) -> bool:
        return self.reader.find(path) is not None

    def spec(self, path: tuple) -> ckpt.ParamSpec:
        return self.reader.spec(path, path in self._stacked or path[:-1] + ("kernel",) in self._stacked)

    def get(self, path: tuple, layer: int | None, rows: slice) -> np.ndarray:
        return self.reader.read(path, layer, rows)

    def scale(self, path: tuple) -> float:
        """alpha / rank, the rank read from the stored lora_a."""
        if self.lora_alpha is None:
            raise ConversionError(
                f"{self.reader.dir}: the checkpoint has LoRA adapters; give their alpha to merge them "
                "(--lora-alpha)"
            )
        return self.lora_alpha / self.reader.array(path[:-1] + ("lora_a",)).shape[-1]


class ModelParams:
    """Parameters of an in-memory LlavaModel (fully addressable arrays: single process)."""

    def __init__(self, model):
        self.flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        self.scales = {
            tuple(p): m.lora_scale
            for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and m.lora_a is not None
        }
        # Arrays spanning several processes: every process reads the same blocks (collective gathers) and
        # only process 0 writes files.
        self.collective = any(not _value(v).is_fully_addressable for v in self.flat.values())
        self._stacked = {k for k in self.flat if "layers" in k and not any(isinstance(x, int) for x in k)}

    def has(self, path: tuple) -> bool:
        return path in self.flat

    def spec(self, path: tuple) -> ckpt.ParamSpec:
        v = _value(self.flat[path])
        return ckpt.ParamSpec(tuple(v.shape), np.dtype(v.dtype), path in self._stacked)

    def get(self, path: tuple, layer: int | None, rows: slice) -> np.ndarray:
        v = _value(self.flat[path])
        return place.gather((v[layer] if layer is not None else v)[rows])

    def scale(self, path: tuple) -> float:
        return float(self.scales[path[:-1]])


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var[...]


@dataclasses.dataclass(frozen=True)
class Out:
    key: str  # 4.x llava-hf key
    entry: keymap.Entry
    info: TensorInfo  # HF shape and output dtype
    pad_rows: int  # vocabulary rows appended (embedding / lm_head)


def _plan(cfg: LlavaConfig, params, dtype: str | None) -> tuple[list[Out], int]:
    entries = keymap.entries(cfg)
    missing = [keymap.path_name(e.param) for e in entries if not params.has(e.param)]
    if missing:
        raise ConversionError(f"the source has no parameters {sorted(set(missing))[:10]} for this config")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; expected one of {DTYPES}")
    vocab = cfg.text.vocab_size
    pad = max(0, cfg.image_token_id + 1 - vocab)
    outs = []
    for e in entries:
        spec = params.spec(e.param)
        out_dtype = _pick_dtype([], dtype) if dtype is not None else spec.dtype
        shape = keymap.hf_shape(e.transform, spec.inner)
        p = pad if e.param in (("llm", "embed_tokens"), ("llm", "lm_head", "kernel")) else 0
        if p:
            shape = (shape[0] + p, *shape[1:])
        outs.append(Out(keymap.export_key(e.hf), e, TensorInfo(shape, np.dtype(out_dtype)), p))
    return outs, vocab + pad


def _shards(outs: list[Out], max_bytes: int) -> list[list[Out]]:
    shards, size = [[]], 0
    for o in outs:
        if shards[-1] and size + o.info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.info.nbytes
    return shards


def _write_tensor(o: Out, params, dst: np.ndarray) -> None:
    e = o.entry
    spec = params.spec(e.param)
    lora = params.has(e.param[:-1] + ("lora_a",)) and e.param[-1] == "kernel"
    if lora:
        scale = np.float32(params.scale(e.param))
        b = np.asarray(params.get(e.param[:-1] + ("lora_b",), e.layer, slice(None)), np.float32)
    body = dst[: dst.shape[0] - o.pad_rows] if o.pad_rows else dst
    sums = []  # per block: sums over the vocabulary (embedding rows / columns of our lm_head kernel)
    for rows in keymap.row_blocks(spec.inner, max(spec.dtype.itemsize, 4 if lora else 1), BLOCK_BYTES):
        block = params.get(e.param, e.layer, rows)
        if lora:
            a = np.asarray(params.get(e.param[:-1] + ("lora_a",), e.layer, rows), np.float32)
            block = block.astype(np.float32) + (a @ b) * scale
        if o.pad_rows:
            sums.append(block.astype(np.float64).sum(0 if e.transform == "copy" else 1))
        keymap.put_hf(e.transform, body, block.astype(o.info.dtype, copy=False), rows)
    if o.pad_rows:  # new vocabulary rows = the mean of the existing ones
        vocab = body.shape[0]
        mean = (np.sum(sums, 0) if e.transform == "copy" else np.concatenate(sums)) / vocab
        dst[vocab:] = mean.astype(o.info.dtype)


def _export(
    cfg: LlavaConfig, params, dst, *, tokenizer_dir, dtype, max_shard_size, overwrite, progress
) -> pathlib.Path:
    dst = pathlib.Path(dst).absolute()
    outs, vocab = _plan(cfg, params, dtype)
    if getattr(params, "collective", False):
        if jax.process_index() != 0:  # take part in the gathers; process 0 writes
            for o in outs:
                _write_tensor(o, params, np.empty(o.info.shape, o.info.dtype))
            return dst
    check_destination(dst, overwrite)
    shards = _shards(outs, parse_size(max_shard_size))
    tmp = temp_dir_for(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        with tqdm(
            total=len(outs), unit="tensor", desc="export", disable=not progress, mininterval=1.0
        ) as bar:
            for name, shard in zip(names, shards):
                writer = SafetensorsWriter(tmp / name, {o.key: o.info for o in shard})
                for o in shard:
                    view = writer.tensor(o.key)
                    _write_tensor(o, params, view)
                    drop_pages(view)
                    del view
                    release_memory()
                    bar.update()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(o.info.nbytes for o in outs)},
                "weight_map": {o.key: n for n, s in zip(names, shards) for o in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        out_dtype = outs[0].info.dtype.name
        (tmp / "config.json").write_text(json.dumps(hfconfig.hf_llava_dict(cfg, vocab, out_dtype), indent=2))
        gen = dict(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        )
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(hfconfig.preprocessor_dict(cfg), indent=2))
        if tokenizer_dir is not None and any(
            (pathlib.Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES
        ):
            _save_tokenizer(pathlib.Path(tokenizer_dir), tmp, cfg.image_token_id)
            (tmp / "processor_config.json").write_text(json.dumps(hfconfig.processor_dict(cfg), indent=2))
        else:
            log.warning(
                "no tokenizer given / found: %s has weights, configs and the image processor only", dst
            )
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _save_tokenizer(src: pathlib.Path, dst: pathlib.Path, image_token_id: int) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers is slow to import; only for the tokenizer)

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    got = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise ConversionError(
            f"{src}: tokenizer has {IMAGE_TOKEN} = {got}, the model expects {image_token_id}"
        )
    tok.save_pretrained(str(dst))


def _find_prefix(reader: ckpt.CheckpointReader) -> tuple:
    """The key prefix of the model parameters in a (training) state tree: where 'llm/embed_tokens' lives."""
    hits = sorted(
        {
            k[: k.index("llm")]
            for k in reader.keys
            if "llm" in k and k[k.index("llm") :][:2] == ("llm", "embed_tokens")
        },
        key=len,
    )
    if not hits:
        raise ConversionError(f"{reader.dir}: no model parameters (llm/embed_tokens) in this checkpoint")
    return hits[0]


def _state_dir(src: pathlib.Path) -> pathlib.Path:
    """`src` itself, `src/state`, or the newest `src/<step>/state` of a checkpoints directory."""
    for d in (src, src / ckpt.STATE):
        if (d / "_METADATA").is_file():
            return d
    steps = (
        sorted((int(p.name), p) for p in src.iterdir() if p.name.isdigit() and (p / ckpt.STATE).is_dir())
        if src.is_dir()
        else []
    )
    if steps:
        return steps[-1][1] / ckpt.STATE
    raise ConversionError(f"{src}: neither an rskd-jax checkpoint nor an orbax state directory")


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    model_config: str | os.PathLike | LlavaConfig | None = None,
    lora_alpha: float | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Exports our checkpoint directory SRC to an HF Llava directory DST.

    SRC may also be a training checkpoint (a step directory, its `state/`, or a checkpoints directory whose
    newest step is used): give `model_config` (our LlavaConfig or its config.json), and `lora_alpha` when the
    student has LoRA adapters (they are merged; the rank is read from the arrays). The model parameters are
    found in the state tree wherever `.../llm/embed_tokens` is (nnx State `value` leaves are accepted).
    """
    src = pathlib.Path(src)
    if ckpt.is_checkpoint(src):
        cfg = LlavaConfig.from_dict(json.loads((src / ckpt.CONFIG).read_text()))
        lc = ckpt.read_provenance(src).get("lora_config")
        params = CheckpointParams(src / ckpt.STATE, cfg, lora_alpha if lc is None else lc["alpha"])
        tok = tokenizer_dir or src
    else:
        if model_config is None:
            raise ConversionError(
                f"{src}: not an rskd-jax checkpoint directory; for a training checkpoint pass model_config "
                "(--model-config: our config.json of the student)"
            )
        cfg = (
            model_config
            if isinstance(model_config, LlavaConfig)
            else LlavaConfig.from_dict(hfconfig.read_json(pathlib.Path(model_config)))
        )
        state = _state_dir(src)
        reader = ckpt.CheckpointReader(state)
        params = CheckpointParams(state, cfg, lora_alpha, _find_prefix(reader))
        tok = tokenizer_dir
    return _export(
        cfg,
        params,
        dst,
        tokenizer_dir=tok,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )


def export_model(
    model,
    cfg: LlavaConfig,
    dst: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> pathlib.Path:
    """Exports an in-memory LlavaModel to an HF directory (LoRA adapters merged; the model is unchanged)."""
    return _export(
        cfg,
        ModelParams(model),
        dst,
        tokenizer_dir=tokenizer_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )
