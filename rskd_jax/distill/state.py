"""What the step trains and carries: `StudentWithMaps` (the student model + the student->teacher feature maps),
`TrainState`, and the feature maps a step spec needs."""

from __future__ import annotations

import flax
import jax
import optax
from flax import nnx

from rskd_jax.distill import losses as L
from rskd_jax.distill.spec import StepSpec


class StudentWithMaps(nnx.Module):
    """The trainable side: the student model plus the student->teacher feature maps (dropped at export)."""

    def __init__(self, model, maps: dict | None = None):
        self.model = model
        self.maps = nnx.Dict(maps or {})


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable subset of StudentWithMaps
    opt_state: optax.OptState
    rng: jax.Array


def maps_for_spec(spec: StepSpec, student_cfg, teacher_cfg, rngs) -> dict:
    """The feature maps a step spec needs (one per aligned layer, + one for projected image tokens)."""
    feat = spec.w("feat_image") + spec.w("feat_text") > 0
    return feature_maps_for(
        spec.feature_layers if feat else (), student_cfg, teacher_cfg, rngs, with_proj=spec.w("feat_proj") > 0
    )


def feature_maps_for(spec_layers, student_cfg, teacher_cfg, rngs, with_proj: bool) -> dict:
    """One learned linear map per aligned hidden layer (+ one for projected image tokens) when widths differ."""
    ds, dt = student_cfg.text.hidden_size, teacher_cfg.text.hidden_size
    maps = {}
    for i, _ in enumerate(spec_layers):
        maps[f"layer{i}"] = L.FeatureProjector(ds, dt, rngs=rngs)
    if with_proj:
        maps["proj"] = L.FeatureProjector(ds, dt, rngs=rngs)
    return maps
