"""Training: state, loop, orbax checkpointing, metric writers, preemption, progress."""
