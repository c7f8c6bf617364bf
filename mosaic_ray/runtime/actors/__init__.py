"""Actors: the shard, a Ray actor owning one GPU's engine and the streams placed on it, and the
collaborators it holds. `shard.py` is `ShardActor`; `engine_runner.py` the one thread that touches
the engine and `engine_guard.py` every call made on it (a failed request vs a broken engine);
`stream_slot.py` a stream's admission, FIFO lock and freeze / thaw; `ingest.py` coalescing, seq
deduplication and backpressure; `capacity.py` admission from the engine's measured busy share;
`load.py` the load reports a shard sends and the scores placement and rebalancing take from them;
`shard_metrics.py` what a shard counts; `shard_migration.py` its end of a move and `migration.py`
the tensors' transport between shards; `shard_durability.py` its snapshots and rebuilds, with
`snapshots.py` taking a stream's snapshots and compacting its log. Above `durability/` (which it
writes through), below `placement/` (which spawns and drives shards): it never imports
`placement/`.
"""
