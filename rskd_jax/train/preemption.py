"""Stopping cleanly: preemption (SIGTERM, JAX's multi-host preemption sync point) and divergence guards.

Loop pattern (the caller saves, then exits 0):
    with PreemptionHandler() as stop:
        for step in range(start, total):
            ...train step...
            if stop.should_stop(step):            # call on EVERY step, on every host
                ckpt.save(step, state, force=True); ckpt.wait(); break

Two modes, chosen on `install()`:

* "signal" (single process, or no JAX preemption service): a Python SIGTERM handler sets a flag; the
  previous handler is restored on `close()`.
* "jax" (multi-process with `jax.distributed` initialised and its preemption service on, the default):
  JAX's C++ notifier already owns SIGTERM and tells every host; `should_stop(step)` is
  `multihost_utils.reached_preemption_sync_point(step)`, which turns True on the SAME step on all hosts.
  No Python handler is installed here: one would replace JAX's notifier (measured: the signalled host then
  stopped alone and the other host ran on).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _jax_preemption_service():
    """JAX's preemption sync manager when the distributed client is initialised, else None."""
    try:
        from jax._src import distributed  # noqa: PLC0415 (private jax module; only multi-process runs)
    except ImportError:  # pragma: no cover - private module moved
        return None
    state = distributed.global_state
    if state.client is None:
        return None
    return getattr(state, "preemption_sync_manager", None)


class PreemptionHandler:
    """Turns SIGTERM / preemption notices into `should_stop(step) -> True` at a step boundary."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *, use_jax_sync_point: bool | None = None):
        self.signals = tuple(signals)
        self.use_jax_sync_point = use_jax_sync_point  # None: auto (when the JAX service is up)
        self.mode: str | None = None
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._stop = False
        self._logged = False

    def install(self) -> PreemptionHandler:
        use_jax = self.use_jax_sync_point
        if use_jax is None:
            use_jax = _jax_preemption_service() is not None
        elif use_jax and _jax_preemption_service() is None:
            raise RuntimeError(
                "use_jax_sync_point=True needs jax.distributed.initialize() with the preemption "
                "service enabled (jax_enable_preemption_service)"
            )
        self.mode = "jax" if use_jax else "signal"
        signals = [s for s in self.signals if not (use_jax and s == signal.SIGTERM)]
        if signals and threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionHandler installed outside the main thread: signal handlers not set")
            signals = []
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if jax.process_count() > 1 and not use_jax:
            log.warning(
                "multi-process run without the JAX preemption service: a SIGTERM stops only the host "
                "that receives it"
            )
        return self

    def _on_signal(self, signum, frame) -> None:  # runs in the main thread between bytecodes
        self._stop = True
        self.reason = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """True when the loop should save and exit after `step`. Call it on every step on every host."""
        if self.mode == "jax":
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self._stop, self.reason = True, self.reason or "preemption sync point"
        if self._stop and not self._logged:
            self._logged = True
            log.warning("stopping at step %d (%s): saving a checkpoint and exiting", step, self.reason)
        return self._stop

    def close(self) -> None:
        """Restores the signal handlers that were there before `install()`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- divergence
class TrainingDiverged(RuntimeError):
    """Raised by NonFiniteGuard after too many non-finite steps in a row."""


class NonFiniteGuard:
    """Counts steps whose loss / gradients were non-finite (and were skipped by the step function).

    `update(step, finite)` returns `finite`; after `max_in_a_row` consecutive non-finite steps it raises
    TrainingDiverged. Skipped steps never change parameters, so the last checkpoint stays good.
    """

    def __init__(self, max_in_a_row: int = 10):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = int(max_in_a_row)
        self.skipped = 0
        self.in_a_row = 0
        self._first_bad: int | None = None

    def update(self, step: int, finite: Any) -> bool:
        finite = bool(finite)
        if finite:
            self.in_a_row, self._first_bad = 0, None
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self._first_bad is None:
            self._first_bad = int(step)
        log.warning(
            "step %d: non-finite loss or gradients; update skipped (%d in a row, %d in total)",
            step,
            self.in_a_row,
            self.skipped,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"training diverged: {self.in_a_row} consecutive steps ({self._first_bad}..{int(step)}) had "
                f"non-finite loss or gradients (limit {self.max_in_a_row}); those updates were skipped, so "
                f"the last saved checkpoint is intact. Lower the learning rate or check the data/loss."
            )
        return False
