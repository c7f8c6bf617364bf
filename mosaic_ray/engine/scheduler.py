"""StepScheduler: what one engine step spends its budgets on (vLLM v1's idea: no prefill or decode
phase, each step takes what every request still needs, under a token budget).

Each step, in this order, while the budgets last:
    1. the decode (or closing) tokens of every active question;
    2. question prefills of interactive questions, oldest first (a prompt is taken whole: its
       retrieval runs once per layer with the prompt's mean query);
    3. frame ingest of streams whose oldest waiting frame is older than `lag_priority_s`, the
       most lagging first;
    4. prefills of batch questions, oldest first;
    5. frame ingest of the other streams, most lagging first (a frame costs its decoder tokens
       and one unit of the encoder budget);
frames are ingested only once due: a full vision batch waits (`encoder_budget` frames, or one
frame of every open stream when there are fewer: no more can come while each sender waits for
its acknowledgement), or the oldest has waited `ingest_wait_s`, or the last ingest forward is
`ingest_wait_s` old (an ingest forward is launch-bound: ~70 ms for 1.4 frames, 135 ms for 16 on
the H200 at 7b-shape; under load,
forwards are spaced so that each carries many frames; a frame after a quiet spell goes in at once;
`StepPlan.wake_in_s` says when the next becomes due);
then, between steps, up to `maintenance_budget` units of upkeep (an offload of a stream's staged
tokens counts one, a cluster split one), streams in turn (background work, never inside a
question's step). While questions or frames wait, splits get at most `maintenance_share` of the
loop's time: each step's foreground seconds earn share / (1 - share) seconds of split time (kept
up to `MAX_SPLIT_CREDIT_S`), every upkeep second spends it (`note_step`), and `StepPlan.split_time_s`
is what the next upkeep may spend on splits (None: no limit, nothing else waits).

Invariants (tests/engine/test_scheduler.py): the token and encoder budgets are never exceeded,
except by a single item alone in an otherwise empty step (a prompt or a frame larger than the
budget still runs); every active question's decode token is in every step while the budget holds
them all, and the least recently served go first when it does not; a stream whose frames wait is
served within a bounded number of steps (lag only grows its priority); a stream busy with its
question's prefill is skipped (`blocked`). Pure policy: no model, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from mosaic_ray.config import SchedulerConfig

MAX_SPLIT_CREDIT_S = 0.5  # split time saved up while splits had nothing to do or were held back


@dataclass(slots=True)
class QuestionWork:
    """A question's need this step: `tokens` it feeds (prompt, 1 to decode, or the closing text)."""

    key: Hashable
    stream_id: str
    phase: str  # prefill | decode | closing
    tokens: int
    interactive: bool = True
    arrived: float = 0.0


@dataclass(slots=True)
class IngestWork:
    """A stream's waiting frames: `frames` of them, the oldest waiting since `oldest` (seconds,
    the engine's clock), each costing `tokens_per_frame` decoder tokens."""

    stream_id: str
    frames: int
    tokens_per_frame: int
    oldest: float
    blocked: bool = False


@dataclass(slots=True)
class StepPlan:
    questions: list[Hashable] = field(default_factory=list)
    ingest: dict[str, int] = field(default_factory=dict)  # stream -> frames this step
    maintenance: dict[str, int] = field(default_factory=dict)  # stream -> splits after the step
    tokens: int = 0
    frames: int = 0
    # tokens by kind, for the step-mix metrics
    decode_tokens: int = 0
    prefill_tokens: int = 0
    ingest_tokens: int = 0
    # seconds until waiting frames become due (None: none waits, or they are due now)
    wake_in_s: float | None = None
    # seconds of cluster splits the upkeep after this step may spend (None: no limit); offloads
    # of staged tokens run regardless
    split_time_s: float | None = None

    @property
    def empty(self) -> bool:
        return not self.questions and not self.ingest


class StepScheduler:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._served: dict[Hashable, int] = {}  # question -> the last step it was in
        self._step = 0
        self._turn = 0  # round-robin start for maintenance
        self._last_ingest = float("-inf")  # when the last ingest forward was planned (`note_ingest`)
        self._split_credit = 0.0  # seconds of split time earned by foreground work (`note_step`)

    def note_step(self, foreground_s: float, upkeep_s: float) -> None:
        """A step ran `foreground_s` of questions and ingest, then `upkeep_s` of upkeep."""
        share = self.config.maintenance_share
        if share >= 1.0 or foreground_s <= 0:  # no limit, or upkeep in otherwise idle time: free
            return
        earned = foreground_s * share / (1.0 - share)
        self._split_credit = min(MAX_SPLIT_CREDIT_S, self._split_credit + earned - upkeep_s)

    def note_ingest(self, now: float) -> None:
        """An ingest forward ran at `now` (planned here, or run outside a step: a question's start)."""
        self._last_ingest = now

    def schedule(self, questions: list[QuestionWork], ingest: list[IngestWork], now: float,
                 maintenance: dict[str, int] | None = None, open_streams: int | None = None) -> StepPlan:
        cfg, plan = self.config, StepPlan()
        self._step += 1
        live = {q.key for q in questions}
        self._served = {k: v for k, v in self._served.items() if k in live}

        def fits(tokens: int, frames: int = 0) -> bool:
            alone = plan.empty
            return alone or (plan.tokens + tokens <= cfg.token_budget and plan.frames + frames <= cfg.encoder_budget)

        # 1. decode / closing: every active question, least recently served first
        running = sorted((q for q in questions if q.phase != "prefill"), key=lambda q: self._served.get(q.key, -1))
        for q in running:
            if fits(q.tokens):
                self._take(plan, q)
                plan.decode_tokens += q.tokens
        prefills = sorted((q for q in questions if q.phase == "prefill"), key=lambda q: q.arrived)
        waiting = [w for w in ingest if w.frames > 0 and not w.blocked]
        full = cfg.encoder_budget if open_streams is None else min(cfg.encoder_budget, max(1, open_streams))
        if waiting and sum(w.frames for w in waiting) < full:  # not a full batch yet
            wait = cfg.ingest_wait_s - max(now - min(w.oldest for w in waiting), now - self._last_ingest)
            if wait > 0:
                plan.wake_in_s, waiting = wait, []
        lagging = sorted((w for w in waiting if now - w.oldest >= cfg.lag_priority_s), key=lambda w: w.oldest)
        others = sorted((w for w in waiting if now - w.oldest < cfg.lag_priority_s), key=lambda w: w.oldest)
        # 2-5. interactive prefills, lagging ingest, batch prefills, other ingest
        self._prefills(plan, [q for q in prefills if q.interactive], fits)
        self._ingest(plan, lagging)
        self._prefills(plan, [q for q in prefills if not q.interactive], fits)
        self._ingest(plan, others)
        if plan.ingest:
            self.note_ingest(now)
        plan.maintenance = self._maintenance(maintenance or {})
        busy = bool(questions) or any(w.frames > 0 for w in ingest)
        if busy and cfg.maintenance_share < 1.0:
            plan.split_time_s = max(0.0, self._split_credit)
        return plan

    def _take(self, plan: StepPlan, q: QuestionWork) -> None:
        plan.questions.append(q.key)
        plan.tokens += q.tokens
        self._served[q.key] = self._step

    def _prefills(self, plan: StepPlan, prefills: list[QuestionWork], fits) -> None:
        for q in prefills:
            if fits(q.tokens):
                self._take(plan, q)
                plan.prefill_tokens += q.tokens

    def _ingest(self, plan: StepPlan, waiting: list[IngestWork]) -> None:
        cfg = self.config
        for w in waiting:
            per = max(1, w.tokens_per_frame)
            room_tokens = (cfg.token_budget - plan.tokens) // per
            room_frames = cfg.encoder_budget - plan.frames
            n = min(w.frames, room_tokens, room_frames)
            if n <= 0 and plan.empty:
                n = 1  # one frame larger than the whole budget still runs, alone
            if n <= 0:
                continue
            plan.ingest[w.stream_id] = n
            plan.tokens += n * per
            plan.frames += n
            plan.ingest_tokens += n * per

    def _maintenance(self, pending: dict[str, int]) -> dict[str, int]:
        """Up to `maintenance_budget` splits over the streams that have some, in turn."""
        budget = self.config.maintenance_budget
        streams = sorted(s for s, n in pending.items() if n > 0)
        if not streams or budget == 0:
            return {}
        start = self._turn % len(streams)
        self._turn += 1
        out: dict[str, int] = {}
        for s in streams[start:] + streams[:start]:
            if budget == 0:
                break
            n = min(pending[s], budget)
            out[s] = n
            budget -= n
        return out
