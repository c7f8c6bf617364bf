"""StepScheduler, without a model: budgets, order, fairness, promotion of lagging streams, bounded
background work."""

import random

import pytest

from mosaic_ray.config import SchedulerConfig
from mosaic_ray.engine.scheduler import IngestWork, QuestionWork, StepScheduler


def q(key, phase="decode", tokens=None, interactive=True, arrived=0.0, stream=None):
    return QuestionWork(key, stream or f"s{key}", phase, tokens if tokens is not None else (1 if phase == "decode" else 20),
                        interactive, arrived)


def w(stream, frames, per=100, oldest=0.0, blocked=False):
    return IngestWork(stream, frames, per, oldest, blocked)


def test_config_is_checked():
    with pytest.raises(ValueError, match="token_budget"):
        SchedulerConfig(token_budget=0)
    with pytest.raises(ValueError, match="encoder_budget"):
        SchedulerConfig(encoder_budget=0)
    with pytest.raises(ValueError, match="ingest_wait_s"):
        SchedulerConfig(ingest_wait_s=-1.0)


def test_budgets_are_never_exceeded_unless_one_item_is_alone():
    rng = random.Random(0)
    for trial in range(300):
        cfg = SchedulerConfig(token_budget=rng.randint(1, 600), encoder_budget=rng.randint(1, 8))
        s = StepScheduler(cfg)
        qs = [q(i, rng.choice(["prefill", "decode", "closing"]), rng.randint(1, 300), rng.random() < 0.5, rng.random())
              for i in range(rng.randint(0, 6))]
        ws = [w(f"v{i}", rng.randint(0, 5), rng.randint(1, 200), rng.random() * 3, rng.random() < 0.2) for i in range(rng.randint(0, 6))]
        last = rng.choice([None, rng.random() * 3])  # when the last ingest forward ran
        if last is not None:
            s.note_ingest(last)
        plan = s.schedule(qs, ws, now=3.0)
        items = len(plan.questions) + len(plan.ingest)
        spent = sum(x.tokens for x in qs if x.key in plan.questions) + sum(
            n * next(x.tokens_per_frame for x in ws if x.stream_id == sid) for sid, n in plan.ingest.items())
        assert spent == plan.tokens == plan.decode_tokens + plan.prefill_tokens + plan.ingest_tokens
        assert plan.frames == sum(plan.ingest.values())
        if items > 1 or (plan.ingest and sum(plan.ingest.values()) > 1):
            assert plan.tokens <= cfg.token_budget and plan.frames <= cfg.encoder_budget, (trial, plan)
        for sid, n in plan.ingest.items():
            src = next(x for x in ws if x.stream_id == sid)
            assert 0 < n <= src.frames and not src.blocked
        # something due is always served: a step is never empty while due work is there
        ready = [x for x in ws if x.frames and not x.blocked]
        due = ready and (sum(x.frames for x in ready) >= cfg.encoder_budget or last is None
                         or 3.0 - min(x.oldest for x in ready) >= cfg.ingest_wait_s
                         or 3.0 - last >= cfg.ingest_wait_s)
        if qs or due:
            assert not plan.empty
        if ready and not due:
            assert not plan.ingest and 0 < plan.wake_in_s <= cfg.ingest_wait_s


def test_frames_wait_to_share_one_forward_until_a_full_batch_or_the_wait_is_over():
    s = StepScheduler(SchedulerConfig(encoder_budget=8, ingest_wait_s=0.5))
    quiet = s.schedule([], [w("a", 1, oldest=9.9)], now=9.9)
    assert quiet.ingest == {"a": 1}  # no ingest for a while: the frame goes in at once
    s.note_ingest(9.95)  # e.g. a question's start ingested its stream's frames
    held = s.schedule([], [w("a", 2, oldest=10.0), w("b", 1, oldest=10.2)], now=10.3)
    # 3 frames, the oldest 0.3 s old, the last forward 0.35 s ago: due 0.15 s from now
    assert held.empty and held.wake_in_s == pytest.approx(0.15)
    due = s.schedule([], [w("a", 2, oldest=10.0), w("b", 1, oldest=10.2)], now=10.5)
    assert due.ingest == {"a": 2, "b": 1}  # the oldest waited 0.5 s: all of them, together
    full = s.schedule([], [w("a", 5, oldest=10.2), w("b", 3, oldest=10.25)], now=10.3)
    assert full.ingest == {"a": 5, "b": 3}  # a full vision batch waits: no reason to hold it
    with_decode = s.schedule([q(1)], [w("a", 1, oldest=10.2)], now=10.3)
    assert with_decode.questions == [1] and not with_decode.ingest  # the decode step stays light
    at_once = StepScheduler(SchedulerConfig(ingest_wait_s=0.0)).schedule([], [w("a", 1, oldest=10.3)], now=10.3)
    assert at_once.ingest == {"a": 1}
    # fewer open streams than a vision batch: a frame of each is a full batch (their senders wait)
    both = s.schedule([], [w("a", 1, oldest=10.2), w("b", 1, oldest=10.25)], now=10.3, open_streams=2)
    assert both.ingest == {"a": 1, "b": 1}
    one_of_three = s.schedule([], [w("a", 1, oldest=10.2), w("b", 1, oldest=10.25)], now=10.3, open_streams=3)
    assert one_of_three.empty


def test_every_decode_token_comes_first():
    s = StepScheduler(SchedulerConfig(token_budget=10, encoder_budget=4))
    qs = [q(i) for i in range(6)] + [q(10, "prefill", tokens=8)]
    plan = s.schedule(qs, [w("a", 3, per=5)], now=0.0)
    assert set(range(6)) <= set(plan.questions) and 10 not in plan.questions  # 6 + 8 > 10
    assert plan.ingest == {}  # 4 tokens left: not one frame of 5


def test_decode_over_budget_serves_the_least_recently_served_first():
    s = StepScheduler(SchedulerConfig(token_budget=3))
    qs = [q(i) for i in range(7)]
    seen = []
    for _ in range(7):
        plan = s.schedule(qs, [], now=0.0)
        assert len(plan.questions) == 3
        seen.append(set(plan.questions))
    for i in range(7):  # nobody waits more than ceil(7 / 3) steps
        gaps = [k for k, st in enumerate(seen) if i in st]
        assert gaps and gaps[0] <= 2 and all(b - a <= 3 for a, b in zip(gaps, gaps[1:]))


def test_order_interactive_then_lagging_ingest_then_batch_then_the_rest():
    cfg = SchedulerConfig(token_budget=100, encoder_budget=10, lag_priority_s=1.0)
    qs = [q("batch", "prefill", 40, interactive=False), q("inter", "prefill", 40)]
    ws = [w("fresh", 5, per=10, oldest=9.8), w("late", 5, per=10, oldest=7.0)]
    plan = StepScheduler(cfg).schedule(qs, ws, now=10.0)
    # 40 (interactive) + 50 (the lagging stream's 5 frames) leaves 10: the batch prefill waits,
    # the fresh stream gets one frame
    assert plan.questions == ["inter"] and plan.ingest == {"late": 5, "fresh": 1}
    # without lag the batch prefill goes before ingest
    ws = [w("fresh", 5, per=10, oldest=9.8), w("late", 5, per=10, oldest=9.5)]
    plan = StepScheduler(cfg).schedule(qs, ws, now=10.0)
    assert plan.questions == ["inter", "batch"] and plan.ingest == {"late": 2}


def test_the_most_lagging_stream_ingests_first_and_none_starves():
    cfg = SchedulerConfig(token_budget=300, encoder_budget=3)
    s = StepScheduler(cfg)
    oldest = {f"v{i}": 0.0 for i in range(8)}
    waiting = {k: 0 for k in oldest}
    served_at = {k: [] for k in oldest}
    for step in range(40):
        now = step * 0.1
        for k in waiting:  # every stream gets a frame every 2 steps
            if step % 2 == 0:
                if waiting[k] == 0:
                    oldest[k] = now
                waiting[k] += 1
        plan = s.schedule([], [w(k, n, per=100, oldest=oldest[k]) for k, n in waiting.items() if n], now)
        lags = {k: now - oldest[k] for k, n in waiting.items() if n}
        if plan.ingest:
            top = max(lags.values())
            assert any(lags[k] == top for k in plan.ingest)  # the most lagging stream is in
        for k, n in plan.ingest.items():
            waiting[k] -= n
            oldest[k] = now  # its remaining frames are the newer ones (an approximation)
            served_at[k].append(step)
    for k, steps in served_at.items():
        assert steps and all(b - a <= 8 for a, b in zip(steps, steps[1:])), (k, steps)


def test_blocked_streams_wait_and_an_oversized_item_runs_alone():
    s = StepScheduler(SchedulerConfig(token_budget=50, encoder_budget=2))
    plan = s.schedule([], [w("busy", 4, blocked=True), w("b", 3, per=200)], now=1.0)
    assert plan.ingest == {"b": 1} and plan.tokens == 200  # one frame bigger than the budget, alone
    plan = s.schedule([q(1, "prefill", tokens=500)], [], now=1.0)
    assert plan.questions == [1]


def test_maintenance_is_bounded_and_takes_turns():
    s = StepScheduler(SchedulerConfig(maintenance_budget=10))
    pending = {"a": 8, "b": 8, "c": 0}
    firsts = []
    for _ in range(4):
        plan = s.schedule([], [], now=0.0, maintenance=pending)
        assert sum(plan.maintenance.values()) <= 10 and "c" not in plan.maintenance
        firsts.append(next(iter(plan.maintenance)))
    assert set(firsts) == {"a", "b"}
    assert StepScheduler(SchedulerConfig(maintenance_budget=0)).schedule([], [], 0.0, {"a": 5}).maintenance == {}


def test_splits_get_their_share_of_time_only_while_work_waits():
    s = StepScheduler(SchedulerConfig(maintenance_share=0.25))
    busy = [q(1)]
    assert s.schedule(busy, [], 0.0, {"a": 5}).split_time_s == 0.0  # nothing earned yet
    s.note_step(0.3, 0.0)  # 0.3 s of foreground work earns 0.1 s of splits
    assert s.schedule(busy, [], 0.0, {"a": 5}).split_time_s == pytest.approx(0.1)
    s.note_step(0.3, 0.15)  # spent more than it earned this step
    assert s.schedule(busy, [], 0.0, {"a": 5}).split_time_s == pytest.approx(0.05)
    s.note_step(0.0, 2.0)  # upkeep in idle time costs nothing
    assert s.schedule([], [w("x", 1)], 0.0, {"a": 5}).split_time_s == pytest.approx(0.05)  # frames wait: busy
    assert s.schedule([], [], 0.0, {"a": 5}).split_time_s is None  # nothing waits: no limit
    for _ in range(100):  # the credit saved up is bounded
        s.note_step(1.0, 0.0)
    assert s.schedule(busy, [], 0.0, {"a": 5}).split_time_s == pytest.approx(0.5)
    unlimited = StepScheduler(SchedulerConfig(maintenance_share=1.0))
    assert unlimited.schedule(busy, [], 0.0, {"a": 5}).split_time_s is None
