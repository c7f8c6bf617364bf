"""Durability: what a stream leaves on storage so that it survives its shard, and how it is read
back. `frame_log.py` is the log store's interface and records, `frame_log_disk.py` the
checksummed per-stream files (fsync policy), `frame_log_stores.py` which store a `DurabilitySpec`
names and where its files go, `log_dir_lock.py` one server per log directory; `frame_codec.py`
the compressed frames the log keeps; `log_order.py` writes a stream's records in the engine's
order, only for accepted operations; `shard_log.py` is a shard's async side of the logs;
`record_check.py` the checks a record passes before `log_replay.py` rebuilds a stream in an
engine from it; `snapshot_plan.py` (a stream's snapshot parts and the rebuild plan),
`snapshot_codec.py` (one part's encoded, checksummed form) and `snapshot_file.py` (its on-disk
slot) are the stored snapshots. The lowest of the runtime's subpackages: it imports only
`runtime/config.py` and `runtime/errors.py`, never `actors/` or `placement/`.
"""
