"""Which `FrameLog` store a `DurabilitySpec` names, and the directory its logs live in.

`open_frame_log` opens "disk" (`DiskFrameLog`, the default), "memory" (`MemoryFrameLog`) or a
deployment's own store named "package.module:attr"; `log_root` is the directory of one runtime's
logs. Kept apart from `frame_log.py` (the store contract and records) so that the contract does
not depend on the stores built on it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_ray.runtime.durability.frame_log import FrameLog, MemoryFrameLog
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog

if TYPE_CHECKING:
    from mosaic_ray.runtime.config import DurabilitySpec

# Where logs live when `DurabilitySpec.root` is not set.
LOG_DIR_ENV = "MOSAIC_RAY_LOG_DIR"
DEFAULT_LOG_DIR = "~/.mosaic_ray/log"


def log_root(spec: DurabilitySpec, runtime_name: str) -> Path:
    """The directory holding runtime `runtime_name`'s logs: `<root>/<runtime_name>/`."""
    root = spec.root or os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR
    return Path(root).expanduser() / runtime_name


def open_frame_log(spec: DurabilitySpec, runtime_name: str) -> FrameLog:
    """The store `spec` names: "disk", "memory", or "package.module:attr" called as
    `attr(spec, runtime_name)`."""
    if spec.store == "disk":
        return DiskFrameLog(log_root(spec, runtime_name), spec.fsync, spec.fsync_interval_ms, spec.max_open_files)
    if spec.store == "memory":
        return MemoryFrameLog()
    module_name, _, attr = spec.store.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    store = factory(spec, runtime_name)
    if not isinstance(store, FrameLog):
        raise TypeError(f"{spec.store} returned {type(store).__name__}, not a FrameLog")
    return store
