"""The real StreamEngine (tiny random-init model, CPU) behind two shard actors: a stream moved
between shards, with its retrieval clusters and host-pool slabs, gives the same greedy answers as
an identical stream that never moved."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.directory import StreamDirectory

pytestmark = pytest.mark.ray

ENGINE_KWARGS = {
    "model": "tiny",
    "device": "cpu",
    # A small window so that most tokens leave it, offloaded in small batches: the move must carry
    # clusters and pool slabs (a snapshot offloads what is still staged first).
    "cache": {"retrieval": "cluster", "window_tokens": 32, "sink_tokens": 4, "offload_batch": 16,
              "pool": {"capacity_bytes": 16 << 20}},
}
FRAMES = 10


@pytest.fixture(scope="module")
def runtime(ray_cluster):
    cfg = RuntimeConfig(
        name="rt-real",
        num_shards=2,
        engine={"kwargs": ENGINE_KWARGS},  # the default factory: StreamEngine.from_spec
        shard={"num_gpus": 1, "num_cpus": 0},
        router={"health_interval_s": 0},
        migration={"timeout_s": 30},
    )
    asyncio.run(connect_runtime(cfg))
    yield cfg
    shutdown_runtime(cfg, forget_streams=True)


def test_greedy_answers_survive_migration_both_ways(runtime):
    a, b = runtime.shard_names
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(FRAMES)]
    stamps = [float(i) for i in range(FRAMES)]

    async def ask(d, sid, q):
        return "".join([x async for x in d.stream(sid, "ask", {"question": q, "max_tokens": 12})])

    async def go():
        d = await StreamDirectory.connect(runtime)
        for sid in ("mover", "stayer"):
            await d.ask_router("create_stream", sid, a)
            await d.call(sid, "append_frames", 0, frames, stamps)
            await d.call(sid, "append_text", "a caption about the scene", 10.0)
            await ask(d, sid, "first question")
        info = await d.call("mover", "stream_info")
        there = await d.ask_router("migrate", "mover", b, "distributed")
        after_there = (await ask(d, "mover", "what now?"), await ask(d, "stayer", "what now?"))
        back = await d.ask_router("migrate", "mover", a, "object_store")
        after_back = (await ask(d, "mover", "and now?"), await ask(d, "stayer", "and now?"))
        return info, there, back, after_there, after_back

    info, there, back, after_there, after_back = asyncio.run(go())
    assert info["past_tokens"] > 0 and info["kv_bytes_host"] > 0  # clusters in the pool did move
    assert (there["transport"], back["transport"]) == ("distributed", "object_store")
    assert after_there[0] == after_there[1]
    assert after_back[0] == after_back[1]


def test_frame_acks_report_pruned_frames(runtime):
    """With pruning switched on for a stream, a batch of one frame repeated is mostly pruned before
    the encoder, and the shard's acknowledgement says how many frames the stream has pruned."""
    a, _ = runtime.shard_names
    frame = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)

    async def go():
        d = await StreamDirectory.connect(runtime)
        await d.ask_router("create_stream", "static", a)
        await d.call("static", "configure_stream", {"pruning": True})
        first = await d.call("static", "append_frames", 0, [frame] * 4, [0.0, 1.0, 2.0, 3.0])
        second = await d.call("static", "append_frames", 1, [frame] * 4, [4.0, 5.0, 6.0, 7.0])
        return first, second, await d.call("static", "stream_info")

    first, second, info = asyncio.run(go())
    assert first["frames_pruned"] == 3 and second["frames_pruned"] == 7  # the first frame is kept
    assert info["frames"] == 1 and info["frames_seen"] == 8 and info["duration_s"] == 7.0


def test_the_shard_carries_the_engines_finish_reason_and_usage(runtime):
    """`answer` and `ask(with_end=True)` end with the StreamEngine's own finish reason and token
    counts (a 2-token cap on the tiny model: "length", unless an end token came first)."""
    a, _ = runtime.shard_names
    frames = [np.random.default_rng(2).integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)]

    async def go():
        d = await StreamDirectory.connect(runtime)
        for sid in ("end-a", "end-b"):
            await d.ask_router("create_stream", sid, a)
            await d.call(sid, "append_frames", 0, frames, [0.0, 1.0])
        request = {"question": "what?", "max_tokens": 2}
        whole = await d.call("end-a", "answer", request)
        items = [x async for x in d.stream("end-b", "ask", request, True)]
        return whole, items

    whole, items = asyncio.run(go())
    *deltas, end = items
    assert "".join(deltas) == whole["text"] and end == {"finish_reason": whole["finish_reason"], "usage": whole["usage"]}
    usage = whole["usage"]
    assert usage["completion_tokens"] <= 2 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # fewer than 2 tokens: an end token came first; 2: the cap, or an end token as the second
    assert whole["finish_reason"] in (("length", "stop") if usage["completion_tokens"] == 2 else ("stop",))
