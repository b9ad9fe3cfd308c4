"""A training progress line: step/total, loss terms, steps/s, tokens/s and ETA, printed every k steps.

    step 120/1000 (12.0%) | loss 1.234 rkl 0.5 pg 0.1 | 3.21 steps/s | 1.23k tok/s | ETA 4m34s

`console_metrics` picks what the line shows: the total loss and the main loss terms (every metric still goes to
metrics.jsonl and TensorBoard); `log_all_metrics=True` in the config shows all of them.

Rates are measured over the window since the previous printed line (so the first line includes compile
time and later ones do not); ETA is the remaining steps at the latest rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np


def format_duration(seconds: float) -> str:
    """4 -> '4s', 274 -> '4m34s', 3723 -> '1h02m03s'."""
    if not np.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(x: float) -> str:
    """1234 -> '1.23k', 2.5e6 -> '2.50M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


MAX_CONSOLE_TERMS = 4  # loss terms shown next to the total loss


def console_metrics(metrics: Mapping[str, Any], all_metrics: bool = False) -> dict[str, Any]:
    """The metrics of the console line: `loss/total` as `loss`, then the first MAX_CONSOLE_TERMS loss terms
    (`loss/<term>`, which the step reports only for terms with a non-zero weight; per-layer `loss/<term>/<i>`
    left out) under their term names. `all_metrics`: every metric under its own name."""
    if all_metrics:
        return dict(metrics)
    out = {"loss": metrics["loss/total"]} if "loss/total" in metrics else {}
    terms = [k for k in metrics if k.startswith("loss/") and k.count("/") == 1 and k != "loss/total"]
    out.update((k.removeprefix("loss/"), metrics[k]) for k in terms[:MAX_CONSOLE_TERMS])
    return out


class Progress:
    """Prints a progress line every `every` steps (and at the last step); `update` returns the line or None.

    Args:
      total_steps: the step count of the run (1-based: call `update(step)` after step `step`).
      every: print interval in steps.
      start_step: the step the run (re)starts from, so a resumed run's rates and ETA are right.
      tokens_per_step: constant tokens per step for tokens/s; or pass `tokens=` to `update`.
      keys: which metrics to show, in order (default: all given).
      stream / clock: injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        every: int = 10,
        start_step: int = 0,
        tokens_per_step: int | None = None,
        keys: Sequence[str] | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prefix: str = "",
    ):
        if every < 1:
            raise ValueError(f"progress interval must be >= 1, got {every}")
        self.total, self.every, self.keys, self.prefix = int(total_steps), int(every), keys, prefix
        self.tokens_per_step, self.stream, self.clock = tokens_per_step, stream, clock
        self._last_step, self._last_time, self._tokens = int(start_step), clock(), 0.0
        self.steps_per_s = self.tokens_per_s = float("nan")

    def update(
        self, step: int, metrics: Mapping[str, Any] | None = None, tokens: float | None = None
    ) -> str | None:
        step = int(step)
        self._tokens += tokens if tokens is not None else 0.0
        if step % self.every and step != self.total:
            return None
        now = self.clock()
        dt, dsteps = now - self._last_time, step - self._last_step
        if dt > 0 and dsteps > 0:
            self.steps_per_s = dsteps / dt
            tok = self._tokens or dsteps * (self.tokens_per_step or 0)
            self.tokens_per_s = tok / dt if tok else float("nan")
        self._last_step, self._last_time, self._tokens = step, now, 0.0
        line = self.format(step, metrics)
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()
        return line

    def format(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        parts = [f"{self.prefix}step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%)"]
        if metrics:
            keys = self.keys if self.keys is not None else list(metrics)
            parts.append(" ".join(f"{k} {float(np.asarray(metrics[k])):.4g}" for k in keys if k in metrics))
        parts.append(f"{self.steps_per_s:.3g} steps/s")
        if np.isfinite(self.tokens_per_s):
            parts.append(f"{format_count(self.tokens_per_s)} tok/s")
        eta = (self.total - step) / self.steps_per_s if self.steps_per_s > 0 else float("nan")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)
