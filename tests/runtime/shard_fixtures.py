"""ShardActor in this process (its class without Ray) over one shared in-memory frame log: a
"killed" shard is dropped and a fresh one replays the logs it left, in milliseconds."""

from __future__ import annotations

from typing import Any

from mosaic_ray.runtime.durability.frame_log import MemoryFrameLog
from mosaic_ray.runtime.actors.shard import ShardActor
from tests.runtime.fake_engine import FACTORY

STORE = "tests.runtime.shard_fixtures:shared_store"  # DurabilitySpec.store naming `shared_store`
_STORES: dict[str, MemoryFrameLog] = {}


def shared_store(spec, runtime_name: str) -> MemoryFrameLog:
    """One MemoryFrameLog per runtime name: every shard of the runtime writes the same logs."""
    return _STORES.setdefault(runtime_name, MemoryFrameLog())


def forget_store(runtime_name: str) -> None:
    _STORES.pop(runtime_name, None)


def local_shard(runtime_name: str, index: int = 0, snapshot_every_frames: int = 0, **engine: Any):
    """A ShardActor of `runtime_name` on the fake engine, its logs in the runtime's shared store.
    Call inside a running event loop (the actor's ingest needs one)."""
    cls = ShardActor.__ray_actor_class__
    return cls(f"{runtime_name}:shard:{index}", {"factory": FACTORY, "kwargs": engine},
               {"num_gpus": 0, "num_cpus": 0}, {},
               {"enabled": True, "store": STORE, "snapshot_every_frames": snapshot_every_frames}, runtime_name)


class MemoryMapStore:
    """A stream map's store (`stream_map.MapStore`) in a dict: the router's map without Ray."""

    def __init__(self, data: dict[str, str] | None = None) -> None:
        self.data = dict(data or {})

    def load(self) -> dict[str, str]:
        return dict(self.data)

    def put(self, stream_id: str, shard: str) -> None:
        self.data[stream_id] = shard

    def delete(self, stream_id: str) -> None:
        self.data.pop(stream_id, None)


def stop_local(shard) -> None:
    """A local shard "killed": its engine thread stops (its logs stay in the shared store)."""
    shard._runner.close()
