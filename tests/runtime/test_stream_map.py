"""The stream->shard map survives reopening its store (a router restart)."""

from __future__ import annotations

import os

from mosaic_ray.runtime.placement.stream_map import JSONFileStore, StreamMap, open_store


def test_file_store_survives_reopen_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "state" / "map.json"
    m = StreamMap(open_store(f"file:{path}", "app", "ns"))
    m.set("a", "shard:0")
    m.set("b", "shard:1")
    m.set("a", "shard:2")
    m.delete("b")
    again = StreamMap(JSONFileStore(str(path)))
    assert again.items() == [("a", "shard:2")]
    assert again.count_by_shard() == {"shard:2": 1}
    assert os.listdir(path.parent) == ["map.json"]
