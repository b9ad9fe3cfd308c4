"""Test-session setup.

* Eight simulated CPU devices for the mesh tests (set before jax is imported anywhere). Single-device
  code runs on device 0 and is unaffected. XLA:CPU compiles at LLVM -O0 (tests/xla_flags.py: the tiny
  models' time is compile time).
* absl flags marked parsed so Grain worker processes work under pytest.
* `RSKD_SHARED_DATA` points at the real UC Merced data (../shared/data); tests that need it skip with
  that reason when it is unset.
"""

import os
import pathlib

from xla_flags import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def shared_data_dir():
    """The shared real-data folder, or None when RSKD_SHARED_DATA is unset / missing."""
    p = os.environ.get("RSKD_SHARED_DATA")
    if not p:
        return None
    path = pathlib.Path(p)
    return path if path.is_dir() else None


@pytest.fixture
def shared_data():
    d = shared_data_dir()
    if d is None:
        pytest.skip("needs the real UC Merced data: set RSKD_SHARED_DATA to ../shared/data")
    return d
