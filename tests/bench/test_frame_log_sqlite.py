"""scaling_bench/frame_log_cost.py --quick for both stores (issue 18: SQLite in WAL mode against
`DiskFrameLog`): the same figures for each, records read back equal to those appended, and the
measurement store `SqliteFrameLog` keeping the frame-log contract the benchmark relies on."""

from __future__ import annotations

import json
import sqlite3

from mosaic_ray.runtime.durability.frame_codec import EncodedFrame
from mosaic_ray.runtime.durability.frame_log import FrameRecord, MarkRecord, OpenRecord, TextRecord
from scaling_bench import frame_log_cost
from scaling_bench.harness.frame_log_sqlite import SqliteFrameLog


def keys_by_store(rows: list[dict]) -> dict[str, set]:
    out: dict[str, set] = {}
    for row in rows:
        out.setdefault(row["store"], set()).update(k for k in row if k != "store")
    return out


def test_quick_harness_reports_the_same_figures_for_both_stores(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert frame_log_cost.main(["--store", "disk,sqlite", "--quick", "--root", str(tmp_path), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["stores"] == ["disk", "sqlite"]
    policies = {(r["store"], r["fsync"]) for r in res["appends"]}
    assert policies == {(s, p) for s in ("disk", "sqlite") for p in ("never", "interval", "always")}
    for rows in (res["appends"], res["replay"]):
        keys = keys_by_store(rows)
        assert keys["disk"] == keys["sqlite"]
    comp = keys_by_store(res["compaction"])
    assert comp["disk"] <= comp["sqlite"]  # sqlite adds its reclaim figures
    for row in res["appends"]:
        assert row["appends_per_s"] > 0 and row["mb_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    for row in res["replay"]:
        assert row["records_equal"] and row["frames"] == res["frames"]
    for row in res["compaction"]:
        assert row["tail_equal"] and row["records_dropped"] > 0 and row["bytes_after"] > 0
    sq = next(r for r in res["compaction"] if r["store"] == "sqlite")
    assert sq["bytes_after_reclaim"] < sq["bytes_before"]


def frames(i: int) -> FrameRecord:
    return FrameRecord(i, (EncodedFrame("jpeg", bytes([i]) * 100, (4, 4, 3)),), (float(i),))


def test_sqlite_store_round_trip_compaction_and_policies(tmp_path):
    for policy, sync in (("never", 0), ("interval", 1), ("always", 2)):
        log = SqliteFrameLog(tmp_path / policy, policy)
        assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._db.execute("PRAGMA synchronous").fetchone()[0] == sync
        recs = [OpenRecord(1.0), frames(0), TextRecord("hi", 0.5), frames(1)]
        assert log.append("a", recs[:2]) is (policy == "always")
        log.append("a", recs[2:])
        log.append("b", [OpenRecord(2.0)])
        assert list(log.read("a")) == recs
        assert list(log.read("a", from_seq=1)) == [frames(1)]
        assert log.list_streams() == ["a", "b"] and log.exists("b") and not log.exists("c")
        log.append("a", [MarkRecord(7, 1), frames(2)])
        assert log.truncate_before("a", 99) == 0
        assert log.truncate_before("a", 7) == 4
        assert list(log.read("a")) == [MarkRecord(7, 1), frames(2)]
        log.delete("b")
        assert log.list_streams() == ["a"]
        log.close()
        # reopened (another process): the same records, appends continue after them
        again = SqliteFrameLog(tmp_path / policy, policy)
        again.append("a", [frames(3)])
        assert list(again.read("a")) == [MarkRecord(7, 1), frames(2), frames(3)]
        again.close()
    assert sqlite3.sqlite_version_info >= (3, 7, 0)  # WAL
