"""Placement: where each stream lives, decided by the router. `router.py` places new streams,
rebalances and drives moves; `shard_pool.py` is the router's shards (handles, health, placements
in flight, load reports; `spawn_shard`); `stream_map.py` the persisted stream -> shard map (Ray
KV or an atomic JSON file); `recovery.py` the router's half of durability (a dead shard's streams
rebuilt on live shards, logged streams rebuilt at start). The top of the runtime's subpackages:
it imports `actors/` and `durability/`, neither imports it; `runtime/bootstrap.py` starts it.
"""
