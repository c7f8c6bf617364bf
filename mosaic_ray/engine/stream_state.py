"""Per-stream bookkeeping of the engine: clock, positions, counters, and chunk assembly."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.model.adapter import Chunk


@dataclass(slots=True, eq=False)
class WaitingFrames:
    """Frames the engine holds and has not ingested yet, in arrival order (`StreamState.deferred`).

    `done` (set by `StreamEngine.ingest_frames`, the serving path) resolves to the frames the
    stream holds once these are ingested, or fails with the error that kept them out (they are
    then dropped: their sender was told). Entries without `done` were acknowledged when queued:
    a failure puts them back at the front of the queue, never drops them. `last` is False for the
    first part of an entry a step split (its `done` resolves with the last part)."""

    frames: list
    timestamps: list[float]
    arrived: float
    done: asyncio.Future | None = None
    last: bool = True

    def settle(self, held: int | None = None, error: BaseException | None = None) -> None:
        """Resolve `done` (if any, and once) with `held`, or fail it with `error`."""
        if self.done is None or self.done.done() or (error is None and not self.last):
            return
        if error is not None:
            self.done.set_exception(error)
        else:
            self.done.set_result(held)


@dataclass(slots=True)
class StreamState:
    """Invariants: `next_pos` is one past the largest position used; `tokens` counts every token
    appended (its `order`); `clock` is the newest timestamp; `block` numbers frames and texts."""

    stream_id: str
    cache: StreamCache
    next_pos: int = 0
    tokens: int = 0
    frames: int = 0
    texts: int = 0
    questions: int = 0
    clock: float = 0.0
    block: int = 0
    busy: bool = False
    # a question started and its prefill has not run: frames wait in `deferred` for that one step
    awaiting_prefill: bool = False
    deferred: list[WaitingFrames] = field(default_factory=list)
    # The stream's redundant-frame pruning (`frame_pruner.PruneState`); set by the engine.
    pruning: Any = None

    @property
    def waiting_frames(self) -> int:
        """Frames the engine holds and has not ingested yet (`deferred`)."""
        return sum(len(w.frames) for w in self.deferred)

    @property
    def oldest_waiting(self) -> float | None:
        """Arrival time (monotonic) of the oldest waiting frame, None when none waits."""
        return self.deferred[0].arrived if self.deferred else None


@dataclass(slots=True)
class Segment:
    """Chunks of one stream fed in one forward: embeds [n, h], absolute positions [P, n],
    per-token time [n], block [n] and text [n] (`Chunk.text`), and the position span they use."""

    embeds: torch.Tensor
    positions: torch.Tensor
    time: torch.Tensor
    block: torch.Tensor
    span: int
    text: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.embeds.shape[0]


def assemble(state: StreamState, chunks: list[Chunk], times: list[float]) -> Segment:
    """Concatenate chunks at the stream's next positions, one block per chunk."""
    embeds, positions, time, block, text = [], [], [], [], []
    offset = state.next_pos
    for i, (chunk, ts) in enumerate(zip(chunks, times)):
        embeds.append(chunk.embeds)
        positions.append(chunk.positions + offset)
        time.append(torch.full((chunk.size,), float(ts)))
        block.append(torch.full((chunk.size,), state.block + i, dtype=torch.int64))
        text.append(torch.full((chunk.size,), chunk.text))
        offset += chunk.span
    return Segment(torch.cat(embeds), torch.cat(positions, 1), torch.cat(time), torch.cat(block), offset - state.next_pos,
                   torch.cat(text))


def commit(state: StreamState, slots: torch.Tensor, seg_time: torch.Tensor, seg_block: torch.Tensor,
           seg_pos: torch.Tensor, span: int, blocks: int, clock: float | None = None,
           seg_text: torch.Tensor | None = None) -> None:
    """Make a step's tokens (K/V already stored in `slots`) part of the stream, then advance the
    counters (all-or-nothing: if the cache refuses, nothing moved and the slots are the caller's).
    seg_pos [P, n] absolute positions; seg_time / seg_block [n]."""
    n = slots.numel()
    order = torch.arange(state.tokens, state.tokens + n)
    state.cache.adopt(slots, order, seg_time.float(), seg_pos.T.contiguous().int(), seg_block, seg_text)
    state.tokens += n
    state.next_pos += span
    state.block += blocks
    if clock is not None:
        state.clock = max(state.clock, clock)
