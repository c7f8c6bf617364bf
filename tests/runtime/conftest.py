"""Fixtures shared by the runtime tests."""

import pytest

from mosaic_ray.runtime.durability.frame_log import MemoryFrameLog
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    """Each frame-log implementation, so one contract test covers both."""
    log = DiskFrameLog(tmp_path / "logs", "always") if request.param == "disk" else MemoryFrameLog()
    yield log
    log.close()
