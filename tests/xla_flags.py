"""XLA flags of the test session and of the processes the tests start.

The tests run tiny models: their time goes into XLA:CPU compiles, not into the compiled code. LLVM's
optimisation level 0 and no expensive LLVM passes make those compiles several times faster; the HLO passes
(fusion, buffer assignment: what `memory_analysis`, `cost_analysis` and the HLO-text tests read) and the
numerics of every op are unchanged (no fast-math either way). Users' runs keep XLA's defaults.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
