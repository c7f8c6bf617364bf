"""QuestionRun: one question being answered, stepped by the engine together with other questions.

Phases: prefill (the prompt, with per-layer retrieval of the past) -> decode (one token a step,
reusing the prefill's retrieved set) -> closing (the last token and the turn's closing text are fed
so they join the stream: one token a step beside decoding runs, in the decode CUDA graph, or the
rest at once in an eager step) -> done (the whole Q/A is appended to the stream's cache like any tokens:
text and video share clusters).

Positions and frames that arrive meanwhile: at its start a run reserves the stream's next
`pos_reserved` positions (as many as its own slots: prompt, answer, closing text) and holds the
stream's resident slots (`StreamCache.hold`); its prefill attends the stream exactly as it was at
the start. Frames that arrive before the prefill step wait for it (`StreamState.awaiting_prefill`,
one step); after it they are ingested while the answer decodes, at positions after the reserved
range, and never change what the answer attends. The Q/A commits at its reserved positions, with
the timestamp of the question's start; if nothing entered the stream meanwhile the unused tail of
the range is given back (positions stay contiguous), else it stays a gap (RoPE sees relative
distances only). A failed run changes nothing of the stream but that gap.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from mosaic_ray.engine.interface import AnswerEnd, AskRequest
from mosaic_ray.engine.detokenizer import IncrementalDetokenizer
from mosaic_ray.engine.sampling import cut_at_stop
from mosaic_ray.engine.stream_state import StreamState
from mosaic_ray.model.attention import StreamStep


@dataclass(slots=True)
class Answer:
    text: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    finish_reason: str
    fetched_tokens: int = 0
    fetched_bytes: int = 0
    copies: int = 0
    fetch_s: float = 0.0
    prefetch_hit_rate: float | None = None


@dataclass(slots=True)
class QuestionRun:
    state: StreamState
    request: AskRequest
    prompt_ids: list[int]
    closing_ids: list[int]
    step: StreamStep
    eos: set[int]
    phase: str = "prefill"
    pos_cursor: int = 0
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    text: str = ""  # the answer's text so far (held-back partial characters excluded)
    detokenizer: IncrementalDetokenizer | None = None
    finish_reason: str = ""
    queue: asyncio.Queue | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    error: BaseException | None = None
    t_start: float = field(default_factory=time.perf_counter)
    t_ask: float | None = None  # `ask` entered the engine (before its start ingested the stream's waiting frames)
    t_planned: float | None = None  # the first step that fed the prompt began
    t_first: float | None = None
    t_done: float | None = None
    pending_pos: list[torch.Tensor] = field(default_factory=list)
    pos_base: int = 0  # the first reserved position; pos_cursor walks [pos_base, pos_base + pos_reserved)
    pos_reserved: int = 0
    clock: float = 0.0  # the stream clock when the question was asked: the Q/A's timestamp
    closing_fed: int = 0  # tokens of `closing_tokens()` fed so far
    released: bool = False
    # slots attended before the question's own tokens: the stream's sink + window, then the past
    # (a `full` stream's slots in place, else the working set's retrieved slots)
    context: torch.Tensor | None = None

    def next_ids(self) -> list[int]:
        if self.phase == "prefill":
            return self.prompt_ids
        if self.phase == "decode":
            return [self.generated[-1]]
        return self.closing_tokens()[self.closing_fed :]

    def closing_tokens(self) -> list[int]:
        """What the closing phase feeds: the last token (unless it is an end token) and the closing text."""
        last = self.generated[-1] if self.generated else None
        return ([last] if last is not None and last not in self.eos else []) + self.closing_ids

    @property
    def closed(self) -> bool:
        """The closing text is fed: the Q/A can join the stream."""
        return self.phase == "closing" and self.closing_fed >= len(self.closing_tokens())

    def take_token(self, token: int, tokenizer) -> str:
        """Take the token chosen after a prefill/decode step; returns the new text to emit (never
        half a character: `IncrementalDetokenizer`)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.detokenizer is None:
            self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.generated.append(token)
        eos = token in self.eos
        if not eos:
            self.text += self.detokenizer.push(token)
        last = eos or len(self.generated) >= self.request.max_tokens or self.cancelled
        if last:  # the answer ends: what was held back comes out now
            self.text += self.detokenizer.finish()
        cut, stopped = cut_at_stop(self.text, self.request.stop)
        if stopped or eos:
            self._finish("stop")
        elif last:
            self._finish("cancelled" if self.cancelled else "length")
        else:
            self.phase = "decode"
        if self.phase != "closing" and self.request.stop:
            # the tail may be the start of a stop string still being written: hold it back
            hold = max(len(x) for x in self.request.stop) - 1
            cut = cut[: max(len(self.emitted), len(cut) - hold)]
        # emit only text that extends what was already sent
        delta = ""
        if cut.startswith(self.emitted):
            delta, self.emitted = cut[len(self.emitted):], cut
        return delta

    def generated_text_ids(self) -> list[int]:
        return [t for t in self.generated if t not in self.eos]

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.phase = "closing"

    def end(self) -> AnswerEnd:
        """Why the answer ended and what it cost: every sampled token (an end token too) is a
        completion token; the prompt is the question's own (`AnswerEnd` says why not the stream's)."""
        return AnswerEnd(self.finish_reason or "stop", len(self.prompt_ids), len(self.generated))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row its retrieval reads from the host pool (what `fetch_stats` counts)."""
        retriever = self.step.cache.retriever
        return retriever._row_bytes * len(retriever.host_parts)

    def answer(self) -> Answer:
        end = self.t_done or time.perf_counter()
        f = self.step.fetch_stats(self.row_bytes)
        return Answer(
            text=self.emitted, token_ids=self.generated_text_ids(), ttft_s=(self.t_first or end) - self.t_start,
            total_s=end - self.t_start, finish_reason=self.finish_reason,
            fetched_tokens=f["tokens"], fetched_bytes=f["bytes"], copies=f["copies"], fetch_s=f["seconds"],
            prefetch_hit_rate=(f["prefetch_hits"] / f["rows"] if f["rows"] else None),
        )
