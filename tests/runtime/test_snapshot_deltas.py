"""Incremental snapshots through the shard path (the ShardActor class in this process, the fake
engine, one shared in-memory store): the delta slots of both stores; a second snapshot after a
few more frames writes far fewer bytes than the first; base + deltas survive a kill and rebuild
with every acknowledged frame and the same answers, replaying only the tail; a new base drops the
old deltas and compacts the log; a corrupt or missing delta falls back to the log for that
stream alone."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from mosaic_ray.runtime.durability.frame_log import FrameRecord, MarkRecord, SnapshotCorruptError
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
from tests.runtime.shard_fixtures import forget_store, local_shard, shared_store, stop_local

FIRST = 160  # frames before the base
MORE = 4  # frames before each delta
# The fake engine's delta holds only the frames since the part before: 4 of 164 here, and the
# notes and a part's fixed cost (torch.save framing) whole.
MAX_DELTA_SHARE = 0.25
_RUNS = itertools.count()
Q = {"question": "what happened?"}


def _frame(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value % 256, np.uint8)


@pytest.fixture
def runtime():
    name = f"deltas-{next(_RUNS)}"
    forget_store(name)
    loop = asyncio.new_event_loop()
    yield name, loop
    loop.close()
    forget_store(name)


class _Feed:
    """One stream's frames, one per batch, seq and ts = its index."""

    def __init__(self, shard, sid: str) -> None:
        self.shard, self.sid, self.n = shard, sid, 0

    async def frames(self, n: int) -> None:
        for _ in range(n):
            await self.shard.append_frames(self.sid, self.n, [_frame(self.n)], [float(self.n)])
            self.n += 1


async def _kill_and_rebuild(name: str, shard, sids, index: int = 1):
    stop_local(shard)
    new = local_shard(name, index, snapshot_every_frames=100_000)
    return new, {sid: await new.recover_stream(sid) for sid in sids}


def test_contract_delta_slots(store):
    store.append("s", [])
    assert store.get_delta("s", 1) is None
    store.put_delta("s", 1, 10, b"one")
    store.put_delta("s", 2, 11, b"two" * 100)
    store.put_delta("s", 1, 12, b"one again")  # a slot is replaced whole
    assert store.get_delta("s", 1) == (12, b"one again") and store.get_delta("s", 2) == (11, b"two" * 100)
    assert store.get_delta("other", 1) is None
    assert store.drop_deltas("s") == 2 and store.get_delta("s", 1) is None and store.drop_deltas("s") == 0
    store.put_delta("s", 1, 13, b"x")
    store.delete("s")
    assert store.get_delta("s", 1) is None


def test_disk_delta_slots_are_named_whole_and_checked(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    log.put_delta("a", 1, 5, b"of a")
    log.put_delta("a.snap", 1, 6, b"of a.snap")  # a stream whose id looks like a slot's name
    (tmp_path / "a.snap.2.tmp").write_bytes(b"torn")
    assert log.drop_deltas("a") == 1 and log.get_delta("a.snap", 1) == (6, b"of a.snap")
    path = log.delta_path("a.snap", 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError):
        log.get_delta("a.snap", 1)


def test_deltas_write_few_bytes_and_survive_a_kill_through_the_shard_path(runtime):
    name, loop = runtime

    async def go():
        shard = local_shard(name, 0, snapshot_every_frames=100_000)  # snapshots when asked
        await shard.open_stream("cam")
        feed = _Feed(shard, "cam")
        await shard.append_text("cam", "before the base", 0.0)
        await feed.frames(FIRST)
        base = await shard.snapshot_stream("cam")
        await feed.frames(MORE)
        first = await shard.snapshot_stream("cam")
        await shard.append_text("cam", "between the deltas", float(feed.n))
        await feed.frames(MORE)
        second = await shard.snapshot_stream("cam")
        await feed.frames(3)  # the tail
        before, answer = await shard.stream_info("cam"), await shard.answer("cam", Q)
        shard, rebuilt = await _kill_and_rebuild(name, shard, ["cam"])
        return base, first, second, before, answer, rebuilt["cam"], await shard.stream_info("cam"), \
            await shard.answer("cam", Q)

    base, first, second, before, answer, rebuilt, after, answer_after = loop.run_until_complete(go())
    assert (base["kind"], first["kind"], second["kind"]) == ("base", "delta", "delta")
    assert (first["index"], second["index"]) == (1, 2) and first["records_dropped"] == 0
    print(f"\nSHARD DELTA: base {base['bytes']} B, deltas {first['bytes']} B, {second['bytes']} B")
    assert first["bytes"] < MAX_DELTA_SHARE * base["bytes"] and second["bytes"] < MAX_DELTA_SHARE * base["bytes"]
    assert rebuilt["snapshot_deltas"] == 2 and rebuilt["snapshot_mark"] == second["mark"]
    assert rebuilt["frames"] == 3 and rebuilt["snapshot_problem"] == ""  # only the tail replayed
    assert (after["frames"], after["last_seq"], after["texts"]) == (before["frames"], before["last_seq"], before["texts"])
    assert answer_after["text"] == answer["text"]
    records = list(shared_store(None, name).read("cam"))
    assert isinstance(records[0], MarkRecord) and records[0].mark == base["mark"]  # compacted to the base only


def test_a_new_base_drops_the_old_deltas_and_compacts_the_log(runtime):
    name, loop = runtime
    store = shared_store(None, name)

    async def go():
        shard = local_shard(name, 0, snapshot_every_frames=100_000)
        await shard.open_stream("cam")
        feed = _Feed(shard, "cam")
        await feed.frames(FIRST - MORE)  # a base large enough that the deltas stay under the ratio
        kinds = []
        for _ in range(shard._durability.snapshots.max_deltas + 2):  # a base, max_deltas deltas, a base again
            await feed.frames(MORE)
            kinds.append(await shard.snapshot_stream("cam"))
            if kinds[-1]["kind"] == "delta":
                assert store.get_delta("cam", kinds[-1]["index"]) is not None
        return kinds

    kinds = loop.run_until_complete(go())
    n = len(kinds) - 2
    assert [k["kind"] for k in kinds] == ["base"] + ["delta"] * n + ["base"]
    assert [store.get_delta("cam", i) for i in range(1, n + 1)] == [None] * n  # the old chain is gone
    records = list(store.read("cam"))
    assert records[0] == MarkRecord(kinds[-1]["mark"], kinds[-1]["last_seq"]) and len(records) == 1
    # the old base's mark, each delta's frames and mark, and the frames before the new base
    assert kinds[-1]["records_dropped"] == 1 + n * (MORE + 1) + MORE


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_delta_falls_back_to_the_log_for_that_stream_only(runtime, damage):
    name, loop = runtime
    store = shared_store(None, name)

    async def go():
        shard = local_shard(name, 0, snapshot_every_frames=100_000)
        feeds = {}
        for sid in ("bad", "good"):
            await shard.open_stream(sid)
            feeds[sid] = _Feed(shard, sid)
            await feeds[sid].frames(FIRST)
            await shard.snapshot_stream(sid)
            for _ in range(2):
                await feeds[sid].frames(MORE)
                await shard.snapshot_stream(sid)
            await feeds[sid].frames(2)
        before = {sid: (await shard.stream_info(sid), await shard.answer(sid, Q)) for sid in feeds}
        if damage == "corrupt":
            mark, blob = store.get_delta("bad", 2)
            store.put_delta("bad", 2, mark, blob[: len(blob) // 2])
        else:
            store._deltas["bad"].pop(1)  # delta 2 is then one of no chain
        shard, rebuilt = await _kill_and_rebuild(name, shard, list(feeds))
        after = {sid: (await shard.stream_info(sid), await shard.answer(sid, Q)) for sid in feeds}
        return before, after, rebuilt

    before, after, rebuilt = loop.run_until_complete(go())
    for sid in ("bad", "good"):
        info, answer = before[sid]
        got, got_answer = after[sid]
        assert (got["frames"], got["last_seq"]) == (info["frames"], info["last_seq"]), sid
        assert info["frames"] == FIRST + 2 * MORE + 2 == info["last_seq"] + 1, sid
        assert got_answer["text"] == answer["text"], sid
    good, bad = rebuilt["good"], rebuilt["bad"]
    assert good["snapshot_deltas"] == 2 and good["frames"] == 2 and good["snapshot_problem"] == ""
    kept = 1 if damage == "corrupt" else 0  # base + delta 1, or the base alone
    assert bad["snapshot_deltas"] == kept and bad["frames"] == 2 + MORE * (2 - kept)
    assert f"delta {kept + 1}" in bad["snapshot_problem"]
    frames_in_log = [r for r in shared_store(None, name).read("bad") if isinstance(r, FrameRecord)]
    assert len(frames_in_log) == 2 * MORE + 2  # the log still holds everything after the base


def test_deltas_outweighing_their_base_bring_a_new_base_early(runtime):
    name, loop = runtime

    async def go():
        shard = local_shard(name, 0, snapshot_every_frames=100_000)
        await shard.open_stream("cam")
        feed = _Feed(shard, "cam")
        kinds = []
        for _ in range(shard._durability.snapshots.max_deltas):
            await feed.frames(MORE)  # a tiny base: each delta costs as much as it (part overhead)
            kinds.append((await shard.snapshot_stream("cam"))["kind"])
        return kinds, shard._durability.snapshots.rebase_ratio

    kinds, ratio = loop.run_until_complete(go())
    assert ratio == 1.0 and kinds[0] == "base" and "base" in kinds[1:-1], kinds
