"""Distillation core: losses (this package's `losses`), teacher-mixed rollout and the distillation step.

Submodules are imported explicitly (`from rskd_jax.distill import losses`) so that importing one does not
pull in the models.
"""
