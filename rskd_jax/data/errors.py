"""Bad-input handling shared by sources, transforms and the pipeline.

Policy (never silent): by default a bad record raises `DataError` naming the file (and line/key) and the
reason; with `skip_bad_records=True` it is skipped, counted, and every skip is logged with its reason.
"""

from __future__ import annotations

import logging

log = logging.getLogger("rskd_jax.data")


class DataError(ValueError):
    """A record, file or folder that cannot be used; the message names the path and the reason."""


class BadRecords:
    """Counts skipped records and logs each one; raises instead when skipping is off.

    One instance per source / transform (per process: Grain worker processes each keep their own count and
    log their own skips).
    """

    def __init__(self, skip: bool, what: str):
        self.skip = bool(skip)
        self.what = what
        self.count = 0

    def __call__(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.count += 1
        log.warning("%s: skipped bad record #%d: %s", self.what, self.count, err)
