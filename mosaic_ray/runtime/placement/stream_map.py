"""StreamMap: which shard owns each stream, persisted so that a router restart loses nothing.

Every change is written through to a store before the router acts on it, and the router reads the
whole map back when it (re)starts:

- `RayKVStore`: one key per stream in Ray's GCS key-value store. O(1) per change; survives a
  router restart (the GCS outlives actors), not a whole-cluster restart.
- `JSONFileStore`: the whole map in one JSON file, replaced atomically (write + fsync + rename):
  a crash leaves the old or the new map, never a torn one; survives a cluster restart. O(streams)
  per change: fine for thousands of streams.

Invariant: `get(s)` equals what the last `put(s, ...)` / `delete(s)` wrote, in this process and in
the next one that opens the same store.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Protocol


class MapStore(Protocol):
    def load(self) -> dict[str, str]: ...
    def put(self, stream_id: str, shard: str) -> None: ...
    def delete(self, stream_id: str) -> None: ...


class RayKVStore:
    def __init__(self, prefix: str, namespace: str) -> None:
        self._prefix = f"{prefix}/streams/"
        self._ns = f"mosaic:{namespace}"

    def load(self) -> dict[str, str]:
        from ray.experimental import internal_kv as kv

        out: dict[str, str] = {}
        for key in kv._internal_kv_list(self._prefix, namespace=self._ns):
            value = kv._internal_kv_get(key, namespace=self._ns)
            if value is not None:
                out[key.decode()[len(self._prefix):]] = value.decode()
        return out

    def put(self, stream_id: str, shard: str) -> None:
        from ray.experimental import internal_kv as kv

        kv._internal_kv_put(self._prefix + stream_id, shard, overwrite=True, namespace=self._ns)

    def delete(self, stream_id: str) -> None:
        from ray.experimental import internal_kv as kv

        kv._internal_kv_del(self._prefix + stream_id, namespace=self._ns)


class JSONFileStore:
    def __init__(self, path: str) -> None:
        self._path = path
        self._map = self.load()

    def load(self) -> dict[str, str]:
        try:
            with open(self._path) as f:
                return dict(json.load(f))
        except FileNotFoundError:
            return {}

    def put(self, stream_id: str, shard: str) -> None:
        self._map[stream_id] = shard
        self._write()

    def delete(self, stream_id: str) -> None:
        self._map.pop(stream_id, None)
        self._write()

    def _write(self) -> None:
        folder = os.path.dirname(os.path.abspath(self._path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".streams-")
        with os.fdopen(fd, "w") as f:
            json.dump(self._map, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)


def open_store(spec: str, prefix: str, namespace: str) -> MapStore:
    """`spec` is RouterSpec.state_store: "ray_kv" or "file:/path/map.json"."""
    if spec == "ray_kv":
        return RayKVStore(prefix, namespace)
    return JSONFileStore(spec.removeprefix("file:"))


class StreamMap:
    """The map itself: a dict written through to a `MapStore`."""

    def __init__(self, store: MapStore) -> None:
        self._store = store
        self._owner = store.load()

    def get(self, stream_id: str) -> str | None:
        return self._owner.get(stream_id)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._owner.items())

    def count_by_shard(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for shard in self._owner.values():
            counts[shard] = counts.get(shard, 0) + 1
        return counts

    def count_prefixed(self, prefix: str) -> int:
        """Streams whose id starts with `prefix` (a tenant's, `serve/auth.py`); O(streams)."""
        return sum(1 for sid in self._owner if sid.startswith(prefix))

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._owner

    def __len__(self) -> int:
        return len(self._owner)

    def set(self, stream_id: str, shard: str) -> None:
        self._store.put(stream_id, shard)
        self._owner[stream_id] = shard

    def delete(self, stream_id: str) -> None:
        self._store.delete(stream_id)
        self._owner.pop(stream_id, None)
