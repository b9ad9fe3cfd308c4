"""Import: a source checkpoint (+ LoRA) -> our parameter tree, validated strictly, streamed tensor by tensor.

`build_plan` checks everything before a byte is written: every parameter of `LlavaModel(cfg)` (from
nnx.eval_shape, so the key table is checked against the model itself) must receive exactly one source tensor
of the right shape; missing, unexpected and mis-shaped keys are reported together in one ConversionError.
`execute` then reads one tensor at a time and hands row blocks of it, converted, to a sink: the on-disk
CheckpointWriter (`import_checkpoint`) or an in-memory one (`convert_in_memory`, for load_pretrained).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time

import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rskd_jax.convert import ckpt, keymap
from rskd_jax.convert.errors import ConversionError, listing
from rskd_jax.convert.files import Reader, TensorRef, release_memory
from rskd_jax.convert.lora import LoraAdapter, open_lora
from rskd_jax.convert.sources import Source, open_source
from rskd_jax.models import LlavaModel, apply_lora
from rskd_jax.models.clip_vit import interpolate_pos_table
from rskd_jax.models.lora import LLAMA_TARGETS, LoRAConfig
from rskd_jax.models.presets import LlavaConfig
from rskd_jax.parallel import place

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class Item:
    entry: keymap.Entry
    ref: TensorRef
    resize: int | None = None  # position table: new grid (GeoChat interpolation)
    lora: tuple[TensorRef, TensorRef, float] | None = None  # merge W + B @ A * scale


@dataclasses.dataclass
class Plan:
    cfg: LlavaConfig
    params: dict[tuple, ckpt.ParamSpec]
    items: list[Item]
    lora_cfg: LoRAConfig | None  # kept adapters
    ignored: list[str]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in self.params.values())


def expected_params(cfg: LlavaConfig, lora_cfg: LoRAConfig | None = None) -> dict[tuple, tuple]:
    """{param path: shape} of LlavaModel(cfg) (+ LoRA adapters), from nnx.eval_shape (nothing allocated)."""

    def make():
        m = LlavaModel(cfg, rngs=nnx.Rngs(0))
        return apply_lora(m, lora_cfg, rngs=nnx.Rngs(1)) if lora_cfg is not None else m

    model = nnx.eval_shape(make)
    return {tuple(k): tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _pick_dtype(refs: list[TensorRef], dtype: str | None) -> np.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype!r}; expected one of {DTYPES}")
        return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    sizes: dict[np.dtype, int] = {}
    for r in refs:
        if r.info.dtype.kind == "f" or r.info.dtype.name == "bfloat16":
            sizes[r.info.dtype] = sizes.get(r.info.dtype, 0) + r.info.nbytes
    best = max(sizes, key=sizes.get) if sizes else np.dtype(np.float32)
    return best if best.name in DTYPES else np.dtype(np.float32)


def _keep_lora_config(adapter: LoraAdapter, entries: dict[str, keymap.Entry]) -> LoRAConfig:
    names, bad = set(), []
    for w in adapter.pairs:
        e = entries.get(w)
        name = e.param[-2] if e is not None else None
        if e is None or e.param[0] != "llm" or name not in LLAMA_TARGETS:
            bad.append(adapter.origin.get(w[: -len(".weight")] + ".lora_A.weight", w))
        else:
            names.add(name)
    if bad:
        raise ConversionError(
            f"{adapter.path}: --lora-mode keep supports adapters on the LLaMA projections "
            f"{LLAMA_TARGETS} only; " + listing("other adapted modules", bad) + " (use --lora-mode merge)"
        )
    # Our LoRAConfig.scale is alpha / rank: express rsLoRA's alpha / sqrt(r) through alpha.
    alpha = adapter.scale * adapter.rank
    return LoRAConfig(rank=adapter.rank, alpha=alpha, dropout=adapter.dropout, targets=tuple(sorted(names)))


def build_plan(
    source: Source,
    *,
    dtype: str | None = None,
    scan_layers: bool = True,
    lora: LoraAdapter | None = None,
    lora_mode: str = "merge",
) -> Plan:
    """Validates the source against LlavaModel(cfg) and returns the conversion plan (see module docstring)."""
    if lora_mode not in ("merge", "keep"):
        raise ConversionError(f"--lora-mode {lora_mode!r}; expected merge or keep")
    refs, origin = dict(source.refs), dict(source.origin)
    if lora is not None:
        refs.update(lora.overrides)
        origin.update({k: lora.origin[k] for k in lora.overrides})
    target = _pick_dtype(list(refs.values()), dtype)
    cfg = source.cfg.replace(scan_layers=scan_layers, param_dtype=target.name, dtype=target.name)
    entries, lora_cfg, merges = _lora_entries(keymap.entries(cfg), lora, lora_mode, refs, origin)
    expected = expected_params(cfg, lora_cfg)
    _check_table(entries, expected)
    stacked = {e.param for e in entries if e.layer is not None}
    params = {p: ckpt.ParamSpec(s, target, p in stacked) for p, s in expected.items()}
    items, missing, shapes, used, merged = _match(entries, refs, origin, params, merges)
    unexpected = list(source.unexpected) + [origin[k] for k in refs if k not in used]
    unexpected += [
        lora.origin.get(w[: -len(".weight")] + ".lora_A.weight", w) + " (LoRA: no such base weight)"
        for w in merges
        if w not in merged
    ]
    if missing or unexpected or shapes:
        parts = [
            listing("missing keys (canonical name, expected HF shape)", missing),
            listing("unexpected keys", unexpected),
            listing("shape mismatches", shapes),
        ]
        hint = (
            " (keep-mode LoRA needs adapters on every layer of each target; try --lora-mode merge)"
            if (lora_cfg is not None and any("lora_" in m for m in missing))
            else ""
        )
        raise ConversionError(
            "the checkpoint does not match the model config: " + "; ".join(p for p in parts if p) + hint
        )
    order = {f: i for i, f in enumerate(dict.fromkeys(it.ref.file for it in items))}
    items.sort(key=lambda it: order[it.ref.file])  # stable: table order within a file
    return Plan(cfg, params, items, lora_cfg, list(source.ignored))


def _lora_entries(entries, lora, lora_mode: str, refs: dict, origin: dict):
    """(entries, keep-mode LoraConfig or None, {base weight: (A, B, scale)} to merge) for an optional adapter;
    keep mode adds the adapters' own entries and their tensors to `refs` / `origin` (updated in place)."""
    by_hf = {e.hf: e for e in entries}
    lora_cfg = None
    merges: dict[str, tuple[TensorRef, TensorRef, float]] = {}
    if lora is not None and lora_mode == "keep":
        lora_cfg = _keep_lora_config(lora, by_hf)
        for w, (a, b) in lora.pairs.items():
            ea, eb = keymap.lora_entries(by_hf[w], lora.modules[w])
            refs[ea.hf], refs[eb.hf] = a, b
            origin[ea.hf], origin[eb.hf] = lora.origin.get(ea.hf, ea.hf), lora.origin.get(eb.hf, eb.hf)
        entries = entries + [
            x
            for e in entries
            if e.param[0] == "llm" and e.param[-1] == "kernel" and e.param[-2] in lora_cfg.targets
            for x in keymap.lora_entries(e, e.hf[: -len(".weight")])
        ]
    elif lora is not None:
        merges = {w: (a, b, lora.scale) for w, (a, b) in lora.pairs.items()}
    return entries, lora_cfg, merges


def _match(entries, refs: dict, origin: dict, params: dict, merges: dict):
    """Each table entry against the checkpoint's tensors -> (items, missing, shape mismatches, used HF names,
    merged LoRA base weights)."""
    items, missing, shapes, used, merged = [], [], [], set(), set()
    for e in entries:
        ref = refs.get(e.hf)
        spec = params[e.param]
        if ref is None:
            missing.append(f"{e.hf} {keymap.hf_shape(e.transform, spec.inner)}")
            continue
        used.add(e.hf)
        got, want = keymap.ours_shape(e.transform, ref.info.shape), spec.inner
        resize = None
        if e.transform == "pos" and got != want and _resizable(got, want):
            resize = int(round((want[0] - 1) ** 0.5))
        elif got != want:
            shapes.append(
                f"{origin[e.hf]}: expected {keymap.hf_shape(e.transform, want)}, found {ref.info.shape}"
            )
            continue
        lo = merges.get(e.hf)
        if lo is not None:
            merged.add(e.hf)
            a, b, _ = lo
            if (
                e.transform != "linear"
                or a.info.shape[1:] != ref.info.shape[1:]
                or b.info.shape[:1] != ref.info.shape[:1]
                or a.info.shape[:1] != b.info.shape[1:]
            ):
                shapes.append(
                    f"{origin.get(e.hf)}: LoRA A {a.info.shape} / B {b.info.shape} do not fit weight "
                    f"{ref.info.shape}"
                )
        items.append(Item(e, ref, resize, lo))
    return items, missing, shapes, used, merged


def _resizable(got: tuple, want: tuple) -> bool:
    square = lambda n: n > 1 and round((n - 1) ** 0.5) ** 2 == n - 1
    return len(got) == 2 and got[1] == want[1] and square(got[0]) and square(want[0])


def _check_table(entries: list[keymap.Entry], expected: dict[tuple, tuple]) -> None:
    """The key table must cover LlavaModel's parameters exactly (guards against model/table drift)."""
    covered: dict[tuple, set] = {}
    for e in entries:
        covered.setdefault(e.param, set()).add(e.layer)
    stray = [p for p in covered if p not in expected]
    uncovered = [
        p
        for p, s in expected.items()
        if p not in covered or (None not in covered[p] and covered[p] != set(range(s[0])))
    ]
    if stray or uncovered:
        raise ConversionError(
            "internal: the key table does not match LlavaModel's parameters: "
            + "; ".join(
                x for x in (listing("not in the model", stray), listing("not covered", uncovered)) if x
            )
        )


def execute(plan: Plan, sink, *, progress: bool = True, desc: str = "convert") -> None:
    """Streams every planned tensor through its transform into `sink.write(path, layer, rows, block)`."""

    reader, current = Reader(), None
    with tqdm(total=len(plan.items), unit="tensor", desc=desc, disable=not progress, mininterval=1.0) as bar:
        for it in plan.items:
            if it.ref.file != current:
                if current is not None:
                    reader.release(current)
                current = it.ref.file
            spec = plan.params[it.entry.param]
            w = reader.get(it.ref)
            if it.resize is not None:
                w = interpolate_pos_table(np.asarray(w, np.float32), it.resize)
            if it.lora is not None:
                a = np.asarray(reader.get(it.lora[0]), np.float32)
                bt = np.asarray(reader.get(it.lora[1]), np.float32).T
            for rows in spec.blocks():
                block = keymap.to_ours(it.entry.transform, w, rows)
                if it.lora is not None:
                    block = block.astype(np.float32) + (a[:, rows].T @ bt) * np.float32(it.lora[2])
                sink.write(it.entry.param, it.entry.layer, rows, block.astype(spec.dtype, copy=False))
                del block
            del w
            release_memory()
            bar.update()
    reader.release()
    sink.finish()


# ----------------------------------------------------------------------------------------------- directories
def temp_dir_for(dst: pathlib.Path) -> pathlib.Path:
    return dst.parent / f".{dst.name}.tmp-{os.getpid()}"


def check_destination(dst: pathlib.Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists (pass --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise ConversionError(f"{dst.parent}: parent directory of the destination does not exist")


def commit(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Atomically puts the finished `tmp` at `dst` (replacing an old `dst` only now)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> int:
    """Copies SRC's tokenizer into DST with `<image>` added if missing (llava-hf: id = old length)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers is slow to import; only for the tokenizer)

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConversionError(f"{src}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.save_pretrained(str(dst))
    return int(tok.convert_tokens_to_ids(IMAGE_TOKEN))


def import_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fmt: str = "auto",
    vision_tower: str | os.PathLike | None = None,
    mm_projector: str | os.PathLike | None = None,
    image_size: int | None = None,
    lora: str | os.PathLike | None = None,
    lora_mode: str = "merge",
    dtype: str | None = None,
    scan_layers: bool = True,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Converts SRC into our checkpoint directory DST (see rskd_jax/convert/ckpt.py); returns DST.

    Everything is validated before writing; the output goes to a temporary sibling directory that is renamed
    to DST only when complete, and removed on any failure.
    """
    t0 = time.time()
    dst = pathlib.Path(dst).absolute()
    check_destination(dst, overwrite)
    source = open_source(
        src, fmt, vision_tower=vision_tower, mm_projector=mm_projector, image_size=image_size
    )
    adapter = open_lora(lora, source.layout) if lora is not None else None
    plan = build_plan(source, dtype=dtype, scan_layers=scan_layers, lora=adapter, lora_mode=lora_mode)
    tmp = temp_dir_for(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        execute(plan, ckpt.CheckpointWriter(tmp / ckpt.STATE, plan.params), progress=progress, desc="import")
        cfg = plan.cfg
        tok_dir = pathlib.Path(tokenizer) if tokenizer is not None else source.tokenizer_dir
        if tok_dir is not None:
            image_id = save_tokenizer(tok_dir, tmp)
            if source.image_token_from_tokenizer:
                cfg = cfg.replace(image_token_id=image_id)
            elif image_id != cfg.image_token_id:
                log.warning(
                    "tokenizer %s has <image> = %d but the config says image_token_index = %d",
                    tok_dir,
                    image_id,
                    cfg.image_token_id,
                )
        else:
            log.warning("no tokenizer files in %s: %s gets none (pass --tokenizer DIR)", src, dst)
        (tmp / ckpt.CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        prov = dict(
            format="rskd-jax-checkpoint",
            version=1,
            source=str(pathlib.Path(src).absolute()),
            source_format=source.format,
            vision_tower=str(vision_tower) if vision_tower else None,
            mm_projector=str(mm_projector) if mm_projector else None,
            lora=str(lora) if lora else None,
            lora_mode=lora_mode if lora else None,
            lora_config=dataclasses.asdict(plan.lora_cfg) if plan.lora_cfg is not None else None,
            dtype=cfg.param_dtype,
            tensors=len(plan.items),
            bytes=plan.nbytes,
            ignored=plan.ignored,
            seconds=round(time.time() - t0, 2),
        )
        (tmp / ckpt.PROVENANCE).write_text(json.dumps(prov, indent=2))
        commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if plan.ignored:
        log.info(
            "ignored %d source tensors (buffers / unused parts): %s", len(plan.ignored), plan.ignored[:5]
        )
    return dst


class ArraySink:
    """In-memory sink: fills one host array per parameter and moves it to its device sharding when complete
    (host memory holds the parameters still being filled, not the whole model)."""

    def __init__(self, params: dict[tuple, ckpt.ParamSpec], shardings: dict[tuple, object] | None = None):
        self.params, self.shardings = params, shardings or {}
        self.arrays: dict[tuple, object] = {}
        self._host: dict[tuple, np.ndarray] = {}
        self._left = {p: (s.shape[0] if s.stacked else 1) * len(s.blocks()) for p, s in params.items()}

    def write(self, path: tuple, layer: int | None, rows: slice, block: np.ndarray) -> None:
        spec = self.params[path]
        host = self._host.get(path)
        if host is None:
            host = self._host[path] = place.aligned_empty(spec.shape, spec.dtype)
        (host[layer] if layer is not None else host)[rows] = block
        self._left[path] -= 1
        if self._left[path] == 0:
            self.arrays[path] = place.put(host, self.shardings.get(path))
            del self._host[path]

    def finish(self) -> None:
        left = [keymap.path_name(p) for p, n in self._left.items() if n]
        if left:
            raise ConversionError(f"internal: parameters not completely written: {left[:8]}")
