"""In-memory state dicts <-> our parameter pure dict, through the same key table (keymap.entries).

For small models and tests (`rskd_jax.models.from_torch` can delegate here): the whole state dict is in
memory. Checkpoint files go through `import_checkpoint` / `export_checkpoint`, which stream.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rskd_jax.convert import keymap
from rskd_jax.convert.errors import ConversionError, listing
from rskd_jax.models.clip_vit import interpolate_pos_table


def params_from_state_dict(cfg, state_dict: Mapping[str, np.ndarray], *, layout: str = "hf-llava") -> dict:
    """An HF state dict (keys in `layout`, a keymap.RULES name) -> LlavaModel pure dict (per cfg.scan_layers).

    Strict: missing or unexpected keys raise (buffers such as rotary inv_freq are skipped). A position table
    with another row count is resized with GeoChat's recipe to cfg.vision.num_positions rows.
    """
    sd, unexpected = {}, []
    for k, v in state_dict.items():
        canon = keymap.canonical_key(k, layout)
        if keymap.IGNORED.search(k) or (layout in keymap.EXTRAS and keymap.EXTRAS[layout].match(k)):
            continue
        if canon is None:
            unexpected.append(k)
        else:
            sd[canon] = np.asarray(v)
    tree: dict = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    entries = keymap.entries(cfg)
    missing = [e.hf for e in entries if e.hf not in sd]
    unexpected += sorted(set(sd) - {e.hf for e in entries})
    if missing or unexpected:
        raise ConversionError(
            "state dict does not match the config: "
            + "; ".join(x for x in (listing("missing", missing), listing("unexpected", unexpected)) if x)
        )
    for e in entries:
        w = keymap.to_ours(e.transform, sd[e.hf], slice(None))
        if e.transform == "pos" and w.shape[0] != cfg.vision.num_positions:
            w = interpolate_pos_table(w, cfg.vision.grid)
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
