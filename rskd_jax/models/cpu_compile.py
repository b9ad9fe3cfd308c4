"""XLA compiler options that keep 16-bit weights in place when the model runs on CPU.

XLA:CPU has no bf16/f16 arithmetic: its float-normalization pass computes every 16-bit op in float32, so
each weight is converted to float32 where it is used (a dot's operand, or the dynamic-slice that takes one
layer out of the stacked weights under `lax.scan`). With the default pipeline two passes then turn those
per-use converts into a float32 copy of *all* the weights at once, twice the bf16 bytes (for GeoChat-7B a
single 27 GB allocation):

- while-loop-invariant-code-motion hoists the convert of a loop-invariant weight out of every while loop:
  the convert of the whole [L, ...] stack out of the layer scan, and of every layer's weights out of a
  decode loop;
- the default (concurrency-optimised) CPU scheduler runs every convert that only needs a parameter first,
  so with unrolled layers all layers' float32 copies are live together.

`compiler_options()` turns both off for CPU compiles: each layer's weights are converted inside the loop
body right before their dots and freed after them (peak temp ~ one layer in float32). Outputs are bitwise
the same (the same converts, moved); see bench/README.md "Real size" for the measured effect. On GPU/TPU
bf16 dots are native and no such converts exist, so the options are not applied there and those compiles
are unchanged.
"""

from __future__ import annotations

import jax

CPU_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_disable_hlo_passes": "while-loop-invariant-code-motion",
}


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """`compiler_options` for `jax.jit` of a model forward/decode: CPU_OPTIONS on CPU, else {}."""
    return dict(CPU_OPTIONS) if (platform or jax.default_backend()) == "cpu" else {}
