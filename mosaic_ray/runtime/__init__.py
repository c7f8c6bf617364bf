"""The Ray runtime: shards, router, durability (docs/architecture-runtime.md).

Layers, each importing only those below it: `config.py` and `errors.py` (shared by all);
`durability/` (frame logs, snapshots' stored form, replay); `actors/` (the shard actor and what
it holds); `placement/` (the router, its shards, the stream map, recovery); `bootstrap.py`
(start / find / stop a runtime by name). `tests/test_runtime_layers.py` checks the order.
"""
