"""Parameter counts per component of a LlavaModel (the seed paper's convention and the full count)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from rskd_jax.models.llava import LlavaModel
from rskd_jax.models.presets import LlavaConfig


def param_counts(cfg_or_model) -> dict[str, int]:
    """Parameter counts per component, from an abstract model (nnx.eval_shape: nothing is allocated).

    `paper_total` is the seed paper's convention (GeoChat-7B = 6,760,723,456 "6760.72M"): LLM + projector +
    the interpolated CLIP position table, CLIP encoder weights excluded. `total` counts everything.
    LoRA parameters, if the model has any, are reported under `lora` and excluded from the other keys.
    """
    if isinstance(cfg_or_model, LlavaConfig):
        model = nnx.eval_shape(lambda: LlavaModel(cfg_or_model, rngs=nnx.Rngs(0)))
    else:
        model = cfg_or_model
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    vision = size(nnx.state(model.vision, base))
    pos = size(nnx.state(model.vision, base)["pos_embed"])
    projector = size(nnx.state(model.projector, base))
    llm = size(nnx.state(model.llm, base))
    out = dict(
        vision=vision,
        vision_without_pos=vision - pos,
        position_table=pos,
        projector=projector,
        llm=llm,
        paper_total=llm + projector + pos,
        total=vision + projector + llm,
    )
    lora = size(nnx.state(model, nnx.LoRAParam))
    if lora:
        out["lora"] = lora
    return out
