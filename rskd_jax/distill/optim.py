"""The optimizer (clip + AdamW with a warm-up schedule) and the trainable-subset filter of the step."""

from __future__ import annotations

import re

import optax
from flax import nnx

from rskd_jax.models.lora import LoRAParam


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def trainable_filter(spec: str):
    """nnx filter for the trainable subset of a `StudentWithMaps` (feature maps are always trainable).

    spec: "all" (every student weight except the frozen CLIP tower), "all+vision", "lora" (LoRA adapters only), or a
    regex searched in the '/'-joined parameter path (big_vision style, e.g. "model/projector/.*").
    """

    def is_map(path):
        return len(path) > 0 and path[0] == "maps"

    if spec == "lora":
        return lambda path, v: isinstance(v, nnx.Param) and (is_map(path) or isinstance(v, LoRAParam))
    if spec in ("all", "all+vision"):
        keep_vision = spec == "all+vision"
        return lambda path, v: (
            isinstance(v, nnx.Param)
            and (is_map(path) or keep_vision or "vision" not in [str(p) for p in path[:2]])
        )
    rx = re.compile(spec)
    return lambda path, v: (
        isinstance(v, nnx.Param) and (is_map(path) or rx.search(path_str(path)) is not None)
    )


def _schedule(cfg, steps: int, warm: int):
    sched_name = cfg.get("schedule", "cosine")
    if sched_name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, max(warm, 1), max(steps, 2), end_value=cfg.lr * cfg.get("end_lr_factor", 0.0)
        )
    if sched_name == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.lr, max(warm, 1)),
                optax.linear_schedule(cfg.lr, 0.0, max(steps - warm, 1)),
            ],
            [warm],
        )
    if sched_name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr)], [warm]
        )
    raise KeyError(f"config optim.schedule={sched_name!r}: expected cosine, linear or constant")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """clip-by-global-norm + AdamW with warm-up and cosine/constant/linear decay (MiniLLM: betas .9/.95)."""
    steps = max(int(cfg.total_steps), 1)
    warm = min(int(cfg.get("warmup_steps", 0)), steps - 1)  # a warm-up longer than the run is clamped
    return optax.chain(
        optax.clip_by_global_norm(cfg.get("grad_clip", 1.0)),
        optax.adamw(
            _schedule(cfg, steps, warm),
            b1=cfg.get("b1", 0.9),
            b2=cfg.get("b2", 0.95),
            eps=cfg.get("eps", 1e-8),
            weight_decay=cfg.get("weight_decay", 0.0),
        ),
    )
