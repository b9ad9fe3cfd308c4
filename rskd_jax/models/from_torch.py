"""Deprecated location of `rskd_jax.convert.from_torch` (kept for bench/common.py; the layering test allows
only this module to import upward). New code: `from rskd_jax.convert import from_torch`."""

from rskd_jax.convert.from_torch import *  # noqa: F403
from rskd_jax.convert.from_torch import __all__  # noqa: F401
