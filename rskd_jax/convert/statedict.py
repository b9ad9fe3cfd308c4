"""In-memory state dicts <-> our parameter pure dict, through the same key table (keymap.entries).

For small models and tests (`rskd_jax.convert.from_torch` delegates here): the whole state dict is in memory.
Checkpoint files go through `import_checkpoint` / `export_checkpoint`, which stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rskd_jax.convert import keymap
from rskd_jax.convert.errors import ConversionError, MissingKeysError, listing
from rskd_jax.models.clip_vit import interpolate_pos_table


def params_from_state_dict(
    cfg, state_dict: Mapping[str, np.ndarray], *, layout: str = "hf-llava", strict: bool = True
) -> dict:
    """An HF state dict (keys in `layout`, a keymap.RULES name) -> LlavaModel pure dict (per cfg.scan_layers).

    Missing keys raise MissingKeysError; unexpected keys raise too unless `strict=False` (buffers such as
    rotary inv_freq are always skipped). A position table with another row count is resized with GeoChat's
    recipe to cfg.vision.num_positions rows.
    """
    return _convert(keymap.entries(cfg), state_dict, layout, strict, cfg.vision)


def vision_params_from_state_dict(
    vision_cfg,
    state_dict: Mapping[str, np.ndarray],
    *,
    scan: bool = True,
    layout: str = "clip",
    strict: bool = True,
) -> dict:
    """A CLIPVisionModel state dict (a VisionConfig) -> ClipVisionModel pure dict, else as above."""
    return _convert(keymap.vision_entries(vision_cfg, scan, root=()), state_dict, layout, strict, vision_cfg)


def text_params_from_state_dict(
    text_cfg,
    state_dict: Mapping[str, np.ndarray],
    *,
    scan: bool = True,
    layout: str = "llama",
    strict: bool = True,
) -> dict:
    """A LlamaForCausalLM state dict (a TextConfig) -> LlamaModel pure dict, else as above."""
    return _convert(keymap.text_entries(text_cfg, scan, root=()), state_dict, layout, strict, None)


def _convert(entries, state_dict: Mapping, layout: str, strict: bool, vision_cfg) -> dict:
    sd, unexpected = {}, []
    for k, v in state_dict.items():
        canon = keymap.canonical_key(k, layout)
        if keymap.IGNORED.search(k) or (layout in keymap.EXTRAS and keymap.EXTRAS[layout].match(k)):
            continue
        if canon is None:
            unexpected.append(k)
        else:
            sd[canon] = v
    missing = [e.hf for e in entries if e.hf not in sd]
    unexpected += sorted(set(sd) - {e.hf for e in entries})
    if missing or (strict and unexpected):
        parts = (listing("missing keys", missing), listing("unexpected keys", unexpected))
        raise (MissingKeysError if missing else ConversionError)(
            "state dict does not match the config: " + "; ".join(x for x in parts if x)
        )
    tree: dict = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    for e in entries:
        w = keymap.to_ours(e.transform, np.asarray(sd[e.hf]), slice(None))
        if e.transform == "pos" and w.shape[0] != vision_cfg.num_positions:
            w = interpolate_pos_table(w, vision_cfg.grid)
        if e.layer is None:
            _set(tree, e.param, np.ascontiguousarray(w))
        else:
            stacks.setdefault(e.param, {})[e.layer] = w
    for param, layers in stacks.items():
        _set(tree, param, np.stack([layers[i] for i in range(len(layers))]))
    return tree


def state_dict_from_params(cfg, tree: Mapping, *, export_layout: bool = False) -> dict[str, np.ndarray]:
    """Inverse of params_from_state_dict: canonical (5.x in-memory) keys, or 4.x llava-hf ones."""
    out = {}
    for e in keymap.entries(cfg):
        w = np.asarray(_get(tree, e.param))
        w = w[e.layer] if e.layer is not None else w
        hf = np.empty(keymap.hf_shape(e.transform, w.shape), w.dtype)
        keymap.put_hf(e.transform, hf, w, slice(None))
        out[keymap.export_key(e.hf) if export_layout else e.hf] = hf
    return out


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for p in path:
        tree = tree[p]
    return tree
