"""LoRA adapters on named Linear layers (PEFT semantics), and merging them into the base weights.

y = x @ W + dropout(x) @ A @ B * (alpha / rank); A [in, r] Kaiming-uniform (as PEFT), B [r, out] zeros.
Adapters are `nnx.LoRAParam` (a subclass of nnx.Param): train only them with
`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`; select the frozen rest with
`nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`. For scanned (stacked) layers the adapters are stacked too.
Dropout is active only when the forward gets a `dropout_rng`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rskd_jax.models.layers import Linear

LoRAParam = nnx.LoRAParam  # the variable type of every adapter weight (filter for the trainer)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """GeoChat defaults: r=64, alpha=16, dropout 0.05 on every LLaMA linear except lm_head."""

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_TARGETS
    exclude: tuple[str, ...] = ("vision", "projector", "lm_head")  # path components never adapted

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_linears(model: nnx.Module, cfg: LoRAConfig):
    """(path, Linear) pairs that `cfg` targets: attribute name in targets, no path component in exclude."""
    for path, m in nnx.iter_modules(model):
        if (
            isinstance(m, Linear)
            and path
            and path[-1] in cfg.targets
            and not set(map(str, path)) & set(cfg.exclude)
        ):
            yield path, m


def apply_lora(model: nnx.Module, cfg: LoRAConfig = LoRAConfig(), *, rngs: nnx.Rngs) -> nnx.Module:
    """Adds LoRA adapters in place (and returns the model). Raises if no layer matches."""
    found = list(lora_linears(model, cfg))
    if not found:
        raise ValueError(f"apply_lora: no Linear named {cfg.targets} outside {cfg.exclude}")
    for _, lin in found:
        if lin.lora_a is not None:
            raise ValueError("apply_lora: model already has LoRA adapters (merge_lora first)")
        kernel = lin.kernel
        *lead, din, dout = kernel.shape
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        dtype = kernel.dtype
        bound = 1.0 / np.sqrt(
            din
        )  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in] == U(-1/sqrt(in), 1/sqrt(in))
        a = jax.random.uniform(rngs.params(), (*lead, din, cfg.rank), dtype, -bound, bound)
        lin.lora_a = nnx.LoRAParam(a, out_sharding=(*names[:-1], "lora_rank"), eager_sharding=False)
        lin.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, cfg.rank, dout), dtype),
            out_sharding=(*names[:-2], "lora_rank", names[-1]),
            eager_sharding=False,
        )
        lin.lora_scale, lin.lora_dropout = cfg.scale, cfg.dropout
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """W <- W + A @ B * scale for every adapted Linear, then drops the adapters (in place; returns model)."""
    for _, lin in nnx.iter_modules(model):
        if isinstance(lin, Linear) and lin.lora_a is not None:
            w = lin.kernel[...]
            delta = jnp.matmul(lin.lora_a[...].astype(jnp.float32), lin.lora_b[...].astype(jnp.float32))
            lin.kernel[...] = (w.astype(jnp.float32) + delta * lin.lora_scale).astype(w.dtype)
            lin.lora_a, lin.lora_b = None, None
            lin.lora_scale, lin.lora_dropout = 0.0, 0.0
    return model


def without_lora(model: nnx.Module) -> nnx.Module:
    """A model sharing `model`'s base weights with its LoRA adapters removed: the base model the adapters were
    trained on (nothing is copied; `model` is unchanged)."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    for _, lin in nnx.iter_modules(clone):
        if isinstance(lin, Linear) and lin.lora_a is not None:
            lin.lora_a, lin.lora_b = None, None
            lin.lora_scale, lin.lora_dropout = 0.0, 0.0
    return clone
